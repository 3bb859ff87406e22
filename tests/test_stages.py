"""Stage functions called directly: score contracts and bad-input errors (invariant 7)."""

import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from flows import runner
from pipeline import config
from pipeline.models import ModelError, load_tokenizer
from pipeline.registry import UnknownName
from stages import generate, score


def scored_rows(tmp_path, cfg, rollouts):
    d = tmp_path / "rollouts"
    d.mkdir()
    pq.write_table(rollouts, d / "rollouts.parquet")
    out = tmp_path / "out"
    out.mkdir()
    res = score.run({"rollouts": d}, out, cfg, runner.Context(iteration=0))
    return pq.read_table(out / "scored.parquet"), res


def rollouts_table():
    resp = [[5, 1], [6, 7, 1], [5, 1]]
    return pa.table(
        {
            "prompt_id": ["a", "a", "b"],
            "prompt": ["rev 1=", "rev 1=", "rev 23="],
            "iteration": [0, 0, 0],
            "prompt_ids": [[1], [1], [2]],
            "pair_id": [0, 0, 1],
            "track_id": [0, 1, 2],
            "parent_track_id": pa.array([None] * 3, pa.int64()),
            "birth_round": [0, 0, 0],
            "own_start": [0, 0, 0],
            "response_ids": resp,
            "logprobs": [[-0.1] * len(r) for r in resp],
            "finish_reason": ["eos"] * 3,
            "response": ["1", " 12 ", "2"],
            "answer": ["1", "12", "32"],
        }
    )


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        textwrap.dedent("""
        def brevity(completions, completion_ids, **kw):
            return [-0.1 * len(ids) for ids in completion_ids]
        def uses_answer(completions, answer, prompts, **kw):
            return [float(a in p) for a, p in zip(answer, prompts)]
        def broken(completions, **kw):
            return [float('nan')] * len(completions)
        def short(completions, **kw):
            return [1.0]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myrewards"
    sys.modules.pop("myrewards", None)


def test_builtin_and_user_rewards_weighted(tmp_path, user_module):
    cfg = config.load(
        None,
        [
            "score.reward_funcs=[exact_match,myrewards:brevity,myrewards:uses_answer]",
            "score.reward_weights=[1.0,2.0,0.5]",
        ],
    )
    t, res = scored_rows(tmp_path, cfg, rollouts_table())
    # exact: 1, 1 (stripped ' 12 '), 0; brevity: -0.2, -0.3, -0.2; uses_answer: 1, 0, 0
    assert t.column("reward_exact_match").to_pylist() == [1.0, 1.0, 0.0]
    assert t.column("reward_brevity").to_pylist() == pytest.approx([-0.2, -0.3, -0.2])
    assert t.column("reward").to_pylist() == pytest.approx([1 - 0.4 + 0.5, 1 - 0.6, -0.4])
    assert t.column("answer").to_pylist() == ["1", "12", "32"]  # prompt columns carried on
    assert res["metrics"]["reward_mean"] == pytest.approx((1.1 + 0.4 - 0.4) / 3)


@pytest.mark.parametrize(
    "func, pattern",
    [
        ("myrewards:broken", r"column 'reward_broken', row 0: is nan"),
        ("myrewards:short", "returned 1 values for 3 completions"),
        ("nosuch", "unknown reward function 'nosuch'.*built-ins: exact_match, numeric_match"),
        ("nomodule_xyz:f", "cannot import module 'nomodule_xyz'"),
    ],
)
def test_bad_reward_functions_fail_clearly(tmp_path, user_module, func, pattern):
    cfg = config.load(None, [f"score.reward_funcs=[{func}]"])
    with pytest.raises((ValueError, UnknownName), match=pattern):
        scored_rows(tmp_path, cfg, rollouts_table())
    assert not (tmp_path / "out" / "scored.parquet").exists()


def test_numeric_match():
    got = score.numeric_match(
        ["the answer is 42", "4.0", "x", "1,000"], answer=["42", "4", "3", "1000"]
    )
    assert got == [1.0, 1.0, 0.0, 1.0]


def test_prompt_longer_than_the_limit_names_the_prompt(tmp_path, policy_dir):
    from pipeline.prompts import materialize

    cfg = config.load(
        None, ["data.demo_size=16", "data.max_prompt_tokens=4", f"model={policy_dir}"]
    )
    prompts = materialize(cfg, tmp_path / "cache")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        schemas.SchemaError,
        match=r"prompt_id 'demo-\d+': \d+ tokens, more than "
        r"data.max_prompt_tokens=4",
    ):
        generate.run(
            {"prompts": prompts, "policy": policy_dir},
            out,
            cfg,
            runner.Context(iteration=0, log=lambda m: None),
        )
    assert list(out.iterdir()) == []


def test_user_prompt_file_and_bad_columns(tmp_path):
    from pipeline.prompts import materialize

    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "rev 12=", "answer": "21"}\n{"question": "rev 3=", "answer": "3"}\n')
    cfg = config.load(None, [f"data.prompts={f}", "data.prompt_column=question"])
    t = pq.read_table(materialize(cfg, tmp_path / "c") / "prompts.parquet")
    assert t.column("prompt").to_pylist() == ["rev 12=", "rev 3="]
    assert t.column("prompt_id").to_pylist() == ["p000000", "p000001"]
    cfg = config.load(None, [f"data.prompts={f}"])
    with pytest.raises(
        schemas.SchemaError,
        match=r"p.jsonl: no column 'prompt' \(data.prompt_column\); "
        r"columns: question, answer",
    ):
        materialize(cfg, tmp_path / "c2")


def test_tokenizer_without_eos_is_rejected(tmp_path, policy_dir):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(policy_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(
        ModelError, match=r"the tokenizer has no EOS token.*Set tokenizer.eos_token"
    ):
        load_tokenizer(d)
    # Without a pad token the EOS token pads (the usual convention), not an error.
    tc["eos_token"], tc["pad_token"] = "</s>", None
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_tokenizer(d)
    assert tok.pad_token_id == tok.eos_token_id


def test_prompt_selection_cycles_without_repeating_a_prompt_in_an_iteration():
    t = pa.table({"prompt_id": [f"p{i}" for i in range(5)], "prompt": ["x"] * 5})
    seen = []
    for it in range(5):
        ids = generate.select_prompts(t, 2, it, seed=0).column("prompt_id").to_pylist()
        assert len(set(ids)) == 2
        seen += ids
    assert sorted(set(seen)) == [f"p{i}" for i in range(5)]  # the shuffle is cycled through
    assert sorted(generate.select_prompts(t, 9, 0, seed=0).column("prompt_id").to_pylist()) == [
        f"p{i}" for i in range(5)
    ]


def test_within_prompt_length_gap_by_hand():
    """Prompt a: incorrect 7, 9 vs correct 4 -> gap 8 - 4 = 4. Prompt b: incorrect 2 vs
    correct 3, 5 -> 2 - 4 = -2. Prompt c: all correct, left out. Mean over a, b: 1.
    (The overall means, 6 incorrect vs 4 correct, would say 2.)"""
    import numpy as np

    from stages.score import within_prompt_gap

    pids = np.array(["a", "a", "a", "b", "b", "b", "c", "c"])
    lens = np.array([7, 9, 4, 2, 3, 5, 4, 4])
    correct = np.array([False, False, True, False, True, True, True, True])
    assert within_prompt_gap(pids, lens, correct) == {"len_gap": 1.0, "len_gap_prompts": 2}
    assert within_prompt_gap(pids, lens, np.ones(8, bool)) == {
        "len_gap": None,
        "len_gap_prompts": 0,
    }
