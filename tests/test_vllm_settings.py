"""The vllm engine's settings and cache key: plain logic, no vLLM needed."""

import json

import pytest

from pipeline import config
from stages import generate, vllm_engine


def key(*overrides):
    return generate.STAGE.key_parts(config.load(None, list(overrides)), {}, 0)


def test_vllm_settings_key_only_vllm_runs_and_only_what_changes_rollouts():
    assert key("generate.vllm_dtype=bfloat16") == key()  # hf runs ignore vllm_*
    v = ["generate.engine=vllm"]
    assert key(*v, "generate.vllm_dtype=bfloat16") != key(*v)
    assert key(*v, "generate.vllm_block_size=64") != key(*v)
    for k in (
        "vllm_gpu_memory_utilization=0.5",
        "vllm_cpu_kvcache_gib=4",
        "vllm_enforce_eager=true",
    ):
        assert key(*v, f"generate.{k}") == key(*v), k  # where/how fast, not what
    # The sync check adds metrics to the output: a cached run must report what a fresh one
    # would, so toggling it reruns generate.
    assert key(*v, "generate.vllm_sync_check=false") != key(*v)
    assert key(*v) != key()


def test_cpu_settings_applied_without_a_gpu(policy_dir, monkeypatch):
    monkeypatch.setattr(vllm_engine, "on_gpu", lambda: False)
    g = config.load(None, ["generate.max_new_tokens=16"]).generate
    kw = vllm_engine.llm_kwargs(policy_dir, g, max_prompt_tokens=64, seed=3)
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True and kw["block_size"] == 32
    assert "gpu_memory_utilization" not in kw
    # 64 + 16 would pass the model's 64 positions: capped at max_position_embeddings.
    assert json.loads((policy_dir / "config.json").read_text())["max_position_embeddings"] == 64
    assert kw["max_model_len"] == 64 and kw["seed"] == 3
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["skip_tokenizer_init"] is True
    g2 = config.load(
        None,
        [
            "generate.vllm_max_model_len=48",
            "generate.vllm_block_size=64",
            "generate.vllm_dtype=bfloat16",
        ],
    ).generate
    kw2 = vllm_engine.llm_kwargs(policy_dir, g2, max_prompt_tokens=64, seed=0)
    assert (kw2["max_model_len"], kw2["block_size"], kw2["dtype"]) == (48, 64, "bfloat16")


def test_gpu_settings(policy_dir, monkeypatch):
    monkeypatch.setattr(vllm_engine, "on_gpu", lambda: True)
    g = config.load(
        None, ["generate.vllm_gpu_memory_utilization=0.45", "generate.vllm_tensor_parallel_size=2"]
    ).generate
    kw = vllm_engine.llm_kwargs(policy_dir, g, max_prompt_tokens=32, seed=0)
    assert kw["gpu_memory_utilization"] == 0.45 and kw["tensor_parallel_size"] == 2
    assert kw["dtype"] == "auto" and kw["enforce_eager"] is False and "block_size" not in kw
    assert kw["max_model_len"] == 32 + 16


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("generate.vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_utilization"),
        ("generate.vllm_tensor_parallel_size=0", "vllm_tensor_parallel_size"),
        ("generate.vllm_dtype=int8", "vllm_dtype"),
    ],
)
def test_bad_vllm_settings_are_clear_errors(bad, msg):
    with pytest.raises(config.ConfigError, match=msg):
        config.load(None, [bad])


def test_request_seeds_differ_per_track_and_iteration():
    seeds = {vllm_engine.request_seed(b, t) for b in range(3) for t in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**31 - 1 for s in seeds)


def test_weights_identity_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(vllm_engine.EngineError, match="safetensors"):
        vllm_engine._weights_identity(tmp_path)
