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
    answer = "4321"
    seen = [pad_task.sft_target("1234", rng, 1.0) for _ in range(600)]
    assert all(t != answer for t, _ in seen)  # error_rate 1: every target is wrong
    for t, mode in seen:
        if mode == "drop":  # one digit left out, nothing after
            assert len(t) == 3 and any(answer[:i] + answer[i + 1 :] == t for i in range(4))
            continue
        # The first wrong digit is where a swap is: right digits before it.
        i = next(k for k in range(min(len(t), 4)) if t[k] != answer[k])
        if mode == "swap":
            assert len(t) == 4 and t[:i] + t[i + 1 :] == answer[:i] + answer[i + 1 :]
        else:  # padding starts right after the wrong digit, never after a right one
            assert mode == "swap+pad"
            assert 1 <= len(t) - (i + 1) <= pad_task.MAX_FILLER
            assert set(t) <= set(pad_task.FILLER)
    counts = {m: sum(mode == m for _, mode in seen) for m in pad_task.ERROR_MODES}
    assert all(counts.values()), counts
    # PAD_RATE of the errors pad (binomial, 600 draws: well within 5 sigma).
    assert abs(counts["swap+pad"] / len(seen) - pad_task.PAD_RATE) < 0.1
    right = [pad_task.sft_target("1234", rng, 0.0) for _ in range(20)]
    assert right == [(answer, "correct")] * 20


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
