"""The lock-step engine on a real transformers model (the shipped demo policy)."""

import pytest
import torch

from eqlen_testing.invariants import check_rollouts
from eqlen_testing.newcomers import assert_newcomers_sample_their_context
from pipeline.demo import make_demo_prompts
from pipeline.models import load_policy, load_tokenizer
from stages import hf_engine
from stages.update import segment_logprobs


@pytest.fixture(scope="module")
def lm(policy_dir):
    return load_policy(policy_dir, torch.device("cpu")), load_tokenizer(policy_dir)


def sample(lm, n_prompts, rounds, temperature=1.0, seed=0, max_new=12, group=8):
    model, tok = lm
    prompts = [
        tok(p)["input_ids"]
        for p in make_demo_prompts(n_prompts, seed=seed).column("prompt").to_pylist()
    ]
    tracks, stats = hf_engine.sample_tracks(
        model,
        prompts,
        group_size=group,
        rounds=rounds,
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
    return prompts, tracks, stats


def rows_of(prompts, tracks):
    return [t.row(prompts) for t in tracks]


def test_kv_copy_logprobs_match_recomputing_the_prefix(lm):
    """Every recorded log-prob (inherited tracks included) equals a from-scratch forward
    pass over prompt + response, the path the update stage uses."""
    model, tok = lm
    prompts, tracks, stats = sample(lm, 24, rounds=4, temperature=1.5)
    assert stats.kv_copies > 0 and stats.inherited_tokens > 0
    check_rollouts(rows_of(prompts, tracks), rounds=4, max_new_tokens=12, eos_id=tok.eos_token_id)
    with torch.no_grad():
        logp, _ = segment_logprobs(
            model,
            [prompts[t.prompt_index] for t in tracks],
            [t.response_ids for t in tracks],
            tok.pad_token_id,
            1.5,
            "cpu",
        )
    for i, t in enumerate(tracks):
        torch.testing.assert_close(
            logp[i, : len(t.logprobs)], torch.tensor(t.logprobs), atol=2e-4, rtol=0
        )


def test_rounds_one_gives_independent_pairs(lm):
    prompts, tracks, stats = sample(lm, 8, rounds=1)
    assert stats.kv_copies == 0 and len(tracks) == 8 * 8
    assert all(t.parent_track_id is None and t.own_start == 0 for t in tracks)


def test_inheritance_does_not_change_the_distribution(lm):
    """A newcomer's first own token must be a fresh sample from p(. | prompt + survivor
    prefix). Under that hypothesis its randomised PIT values are Uniform(0, 1): a KS test at
    the 1% level (critical value 1.63 / sqrt(n)). The same test applied with a wrong context
    (the prompt alone) must reject, which shows the test can fail."""
    model, tok = lm
    T = 1.5
    prompts, tracks, _ = sample(lm, 48, rounds=2, temperature=T, seed=3)
    assert_newcomers_sample_their_context(model, tok, prompts, tracks, T)


def test_top_k_and_top_p_filters_by_hand():
    """probs 1/6, 2/6, 3/6: top_k=2 drops the first; top_p=0.5 keeps only the 3/6 token
    (mass before it 0 < 0.5), top_p=0.6 keeps 3/6 and 2/6 (mass before 2/6 is 0.5 < 0.6)."""
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))

    def keep(x):
        return torch.isfinite(x)[0].tolist()

    assert keep(hf_engine._filter_logits(logits, 2, 1.0)) == [False, True, True]
    assert keep(hf_engine._filter_logits(logits, 0, 0.5)) == [False, False, True]
    assert keep(hf_engine._filter_logits(logits, 0, 0.6)) == [False, True, True]
