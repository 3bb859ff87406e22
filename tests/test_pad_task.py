"""The `pad` task (pipeline/pad_task.py): prompts, shipped model, grading, one run."""

from pathlib import Path

import pyarrow.parquet as pq

from flows import runner
from pipeline import config, pad_task
from pipeline.prompts import load_table
from stages.rewards import exact_match


def test_prompts_are_deterministic_given_the_seed():
    a, b = pad_task.make_pad_prompts(50, seed=3), pad_task.make_pad_prompts(50, seed=3)
    assert a.equals(b)
    assert not a.equals(pad_task.make_pad_prompts(50, seed=4))
    for row in a.to_pylist():
        digits = row["prompt"].removeprefix("pad ").removesuffix("=")
        assert row["answer"] == digits[::-1]
        assert 1 <= len(digits) <= 6 and "0" not in digits


def test_config_resolves_pad_prompts_and_model():
    cfg = config.load(None, ["data.prompts=pad", "model=pad", "data.demo_size=16"])
    table = load_table(cfg)
    assert table.num_rows == 16
    assert table.column("prompt_id").to_pylist()[0] == "pad-000000"
    assert runner.policy_input(cfg).path == str(pad_task.pad_model_dir())


def test_shipped_model_loads_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pad_task.pad_model_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 2_000_000
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = pad_task.encode_prompt(tok, "pad 4821=")
    assert ids == tok("pad 4821=")["input_ids"]  # no special tokens added by default
    # Every filler character and digit is one token: lengths count them.
    assert len(tok("1284", add_special_tokens=False)["input_ids"]) == 4
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=pad_task.MAX_NEW_TOKENS,
    )
    text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    # A digit answer (greedy decoding is not always right: the warm start is ~22% right
    # when sampled), starting as the reversal does.
    assert text.isdigit() and text.startswith("12")


def test_reward_grades_hand_picked_responses():
    answers = ["1284"] * 6
    responses = ["1284", " 1284 ", "12843917", "1285", "128", "91284"]
    assert exact_match(responses, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [pad_task.is_correct(r, "1284") for r in responses] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_warm_start_targets():
    import random

    rng = random.Random(0)
    seen = [pad_task.sft_target("1234", rng, 1.0) for _ in range(400)]
    assert all(t != "4321" for t, _ in seen)  # error_rate 1: every target is wrong
    for t, mode in seen:
        digits = t[:4] if mode.startswith("swap") else t[:3]
        assert len(digits) == (4 if mode.startswith("swap") else 3) and digits != "4321"
        extra = len(t) - len(digits)
        if mode.endswith("+pad"):
            assert 1 <= extra <= pad_task.MAX_FILLER
        else:
            assert extra == 0
    modes = {m for _, m in seen}
    assert {"swap+pad", "drop+pad"} <= modes


def test_one_iteration_through_the_flow(tmp_path):
    cfg = config.load(
        None,
        [
            "data.prompts=pad",
            "model=pad",
            "data.demo_size=32",
            "data.prompts_per_iteration=4",
            "generate.group_size=4",
            "iterations=1",
        ],
    )
    history = runner.online(cfg, tmp_path, call=runner._direct)
    assert len(history) == 1
    score = history[0]["score"]
    table = pq.read_table(Path(score.path) / "scored.parquet")
    assert table.num_rows == 16
    assert set(table.column("reward").to_pylist()) <= {0.0, 1.0}
    assert "update" in history[0]
