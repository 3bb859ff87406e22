"""The embedded demo task: prompts, tokenizer, shipped checkpoint and builder."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo import (
    BOS_ID,
    EOS_ID,
    ERROR_MODES,
    PAD_ID,
    build_demo_model,
    build_tokenizer,
    demo_model_dir,
    encode_prompt,
    encode_response,
    evaluate,
    is_correct,
    make_demo_prompts,
    sft_target,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_prompts_are_deterministic_and_answers_reverse_the_digits():
    a = make_demo_prompts(200, seed=3)
    assert a.schema.names == ["prompt_id", "prompt", "answer"]
    assert all(t == pa.string() for t in a.schema.types)
    assert a.equals(make_demo_prompts(200, seed=3))
    assert not a.equals(make_demo_prompts(200, seed=4))
    ids = a.column("prompt_id").to_pylist()
    assert ids[0] == "demo-000000" and len(set(ids)) == 200
    for row in a.to_pylist():
        assert row["prompt"].startswith("rev ") and row["prompt"].endswith("=")
        digits = row["prompt"][4:-1]
        assert digits.isdigit() and row["answer"] == digits[::-1]
        assert 1 <= len(digits) <= 8
    assert {len(r) for r in a.column("answer").to_pylist()} == set(range(1, 9))


def test_prompt_digit_range_is_respected():
    t = make_demo_prompts(50, seed=0, min_digits=3, max_digits=4)
    assert {len(a) for a in t.column("answer").to_pylist()} == {3, 4}
    with pytest.raises(ValueError):
        make_demo_prompts(1, min_digits=5, max_digits=2)


def test_tokenizer_one_token_per_digit_and_special_tokens(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert tok.padding_side == "left"
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digit_ids)) == 10
    for answer in ["0", "1284", "00700", "98765432"]:
        ids = encode_response(tok, answer)
        assert ids[-1] == EOS_ID and len(ids) == len(answer) + 1
        assert ids[:-1] == [digit_ids[int(c)] for c in answer]
        assert tok.decode(ids, skip_special_tokens=True) == answer
    # No special tokens are added to prompts, whatever the caller asks for.
    p = encode_prompt(tok, "rev 4821=")
    assert (
        p == tok("rev 4821=")["input_ids"] == tok("rev 4821=", add_special_tokens=True)["input_ids"]
    )
    assert not {PAD_ID, EOS_ID, BOS_ID} & set(p)
    assert p[-5:] == [
        digit_ids[4],
        digit_ids[8],
        digit_ids[2],
        digit_ids[1],
        tok.convert_tokens_to_ids("="),
    ]
    assert tok.decode(p) == "rev 4821="


def test_is_correct_requires_exact_text_and_eos():
    assert is_correct("1284", "1284")
    assert not is_correct("1284", "1284", finished=False)
    assert not is_correct("12840", "1284") and not is_correct("128", "1284")


def test_shipped_checkpoint_loads_and_matches_the_tokenizer(tok):
    d = demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d)
    shipped = AutoTokenizer.from_pretrained(d)
    assert model.config.vocab_size == len(shipped) == len(tok)
    assert shipped.get_vocab() == tok.get_vocab()
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (
        EOS_ID,
        PAD_ID,
        BOS_ID,
    )
    assert model.generation_config.eos_token_id == EOS_ID
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    assert not model.config.tie_word_embeddings
    assert sum(f.stat().st_size for f in d.iterdir()) < 2_000_000
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"


def test_shipped_checkpoint_solves_the_task_sometimes_at_every_length():
    # The shipped model is ~48% accurate at temperature 1, evenly over digit
    # counts, and wrong answers are longer (see the module docstring); RL needs
    # it neither hopeless nor already solved.
    r = evaluate(demo_model_dir(), n_prompts=96, samples=2, seed=1)
    assert 0.3 < r["accuracy"] < 0.65
    assert all(0.2 < a < 0.8 for a in r["accuracy_by_digits"].values()), r["accuracy_by_digits"]
    assert r["mean_len_correct"] + 0.5 < r["mean_len_incorrect"]


def test_shipped_checkpoint_has_the_skill_when_decoding_greedily():
    # Its errors are sampled behaviours, not a missing skill: the most likely
    # answer is the reversal, for long numbers too.
    r = evaluate(demo_model_dir(), n_prompts=96, samples=1, seed=2, temperature=1e-4)
    assert r["accuracy"] > 0.85
    assert min(r["accuracy_by_digits"].values()) > 0.6, r["accuracy_by_digits"]


def test_sft_targets_mix_the_reversal_with_the_error_modes():
    import random

    assert sft_target("4821", random.Random(0), 0.0) == ("1284", "correct")
    rng, seen = random.Random(0), {}
    for _ in range(4000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
        answer = digits[::-1]
        target, mode = sft_target(digits, rng, 0.6)
        seen[mode] = seen.get(mode, 0) + 1
        if mode == "correct":
            assert target == answer
        elif mode == "ramble":
            extra = target[len(answer) :]
            assert target.startswith(answer) and 1 <= len(extra) <= 4 and answer.endswith(extra)
        elif mode == "drop":
            assert len(target) == len(answer) - 1 >= 1
            assert any(answer[:i] + answer[i + 1 :] == target for i in range(len(answer)))
        else:
            assert mode == "swap" and len(target) == len(answer)
            assert sum(a != b for a, b in zip(target, answer)) == 1
    assert set(seen) == {"correct", *ERROR_MODES}
    assert 0.35 < seen["correct"] / 4000 < 0.45  # 0.4, plus single-digit drops kept correct
    assert seen["ramble"] > seen["drop"] + seen["swap"] > 0


def test_build_demo_model_writes_a_loadable_deterministic_checkpoint(tmp_path, capsys):
    a = build_demo_model(tmp_path / "a", steps=4, seed=7, log_every=2)
    b = build_demo_model(tmp_path / "b", steps=4, seed=7, log_every=2)
    assert "step 4/4" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert model.config.vocab_size == len(tok)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ids = torch.tensor([encode_prompt(tok, "rev 12=")])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
    assert out.shape[1] > ids.shape[1]
