"""The README's GSM8K-style run, end to end as a user runs it: `eqlen example chat`, then
one `eqlen run` (chat prompts with a system prompt, math_verify, LoRA, held-out eval every
iteration, TensorBoard) through the real Prefect flow, then `eqlen export`, whose folder
`from_pretrained` loads with its chat template and the trained (merged) weights."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from eqlen_testing.cli import eqlen

pytestmark = [pytest.mark.flow, pytest.mark.slow]


@pytest.fixture(scope="module")
def chat_run(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    eqlen("example", "chat", root / "example")
    run_dir = root / "run"
    p = eqlen("run", "--config", root / "example" / "config.yaml", "--run-dir", run_dir)
    return root, run_dir, p


def test_the_chat_run_evaluates_trains_lora_and_logs(chat_run):
    root, run_dir, p = chat_run
    assert "avg@4" in p.stdout and "pass@4" in p.stdout
    data = json.loads(eqlen("show", run_dir, "--json").stdout)
    its = data["iterations"]
    assert len(its) == 3  # two iterations and the final policy's eval
    assert [sorted(it["stages"]) == ["eval"] for it in its] == [False, False, True]
    for it in its:
        ev = it["stages"]["eval"]["metrics"]
        assert ev["n_prompts"] == 8 and 0 <= ev["avg@4"] <= ev["pass@4"] <= 1
    for it in its[:2]:
        st = it["stages"]
        assert st["update"]["metrics"]["lora_r"] == 8
        scored = pq.read_table(Path(st["score"]["path"]) / "scored.parquet")
        assert {"reward_math_verify", "reward_boxed_format"} <= set(scored.column_names)
        # The prompts are conversations, the system prompt first.
        conv = scored.column("prompt")[0].as_py()
        assert conv[0]["role"] == "system" and "boxed" in conv[0]["content"]
    events = list((run_dir / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"


def test_export_writes_a_clean_loadable_folder(chat_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run_dir, _ = chat_run
    out = root / "exported"
    p = eqlen("export", run_dir, out)
    assert "exported the policy of iteration 1" in p.stdout
    names = {f.name for f in out.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert not names & {"optimizer.pt", "trainer_state.json", "adapter"}
    data = json.loads(eqlen("show", run_dir, "--json").stdout)
    trained = Path(data["iterations"][1]["stages"]["update"]["path"]) / "model"
    want = load_file(trained / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False
    )
    # A non-empty folder is refused (exit 2) unless --force; an earlier iteration by name.
    again = eqlen("export", run_dir, out, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    eqlen("export", run_dir, out, "--iteration", "0", "--force")
    first = Path(data["iterations"][0]["stages"]["update"]["path"]) / "model"
    assert (
        load_file(out / "model.safetensors").keys() == load_file(first / "model.safetensors").keys()
    )
    assert all(
        torch.equal(load_file(out / "model.safetensors")[k], v)
        for k, v in load_file(first / "model.safetensors").items()
    )
    bad = eqlen("export", run_dir, root / "x", "--iteration", "7", check=False)
    assert bad.returncode == 2 and "no update at that iteration" in bad.stderr
