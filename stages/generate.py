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

A prompt is text, tokenized as the tokenizer does by default (its special tokens
included), or a conversation (a list of {role, content} messages, TRL's conversational
format), rendered by the tokenizer's chat template with the generation prompt, as TRL and
verl do: `prompt_ids` are the template's tokens, so the policy sees what it was tuned on.

Departure from the paper: none in the sampling itself; the recorded log-probs are of the
temperature-scaled distribution before top-p/top-k filtering (as TRL recomputes them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.config import Config
from pipeline.models import load_tokenizer
from pipeline.stage import Stage
from stages import hf_engine, vllm_engine  # noqa: F401  (register the engines)
from stages.engine import ENGINES, canonical


def reads(cfg: Config) -> tuple[str, ...]:
    return (
        "seed",
        "generate.engine",
        "generate.group_size",
        "generate.rounds",
        "generate.max_new_tokens",
        "generate.temperature",
        "generate.top_p",
        "generate.top_k",
        "data.prompts_per_iteration",
        "data.max_prompt_tokens",
        *ENGINES.get(cfg.generate.engine).reads,
    )


def select_prompts(table: pa.Table, n: int, iteration: int, seed: int) -> pa.Table:
    """This iteration's prompts: positions [i*n, (i+1)*n) of a seeded shuffle, cycling.
    At most every prompt once per iteration (a prompt twice would merge two groups)."""
    n = min(n, table.num_rows)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    take = order[(np.arange(n) + iteration * n) % table.num_rows]
    return table.take(pa.array(take))


def prompt_encoder(tokenizer, policy: Path, prompts_file: Path):
    """prompt (text or messages) -> token ids, as the policy's tokenizer renders it."""

    def encode(prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if tokenizer.chat_template is None:
            raise schemas.SchemaError(
                f"file {prompts_file}, column 'prompt': the prompts are conversations (lists "
                f"of messages), but the tokenizer of {policy} has no chat template to render "
                "them. Use a chat model's tokenizer, set tokenizer.chat_template and "
                "save_pretrained, or give text prompts."
            )
        # The template writes the special tokens itself (TRL: add_special_tokens=False).
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    return encode


def on_workers(policy: Path, prompt_ids, cfg, ctx, check_ids) -> tuple[list, dict]:
    """The engine on `generate.workers` Ray actors (stages/workers.py), each sampling a
    contiguous shard of the prompts; their tracks merged with ids made unique (then
    canonical), their counters summed (timings: the slowest worker's)."""
    from pipeline import cluster
    from stages import workers

    n = cfg.generate.workers
    cluster.connect(cfg.cluster.ray_address, n + cfg.update.workers)
    pool = workers.rollout_pool(cfg, ctx.log)
    workers.check_paths(pool, [str(policy)], "rollout")
    bounds = np.linspace(0, len(prompt_ids), n + 1).astype(int)
    refs = [
        w["actor"].generate.remote(
            str(policy), prompt_ids[a:b], cfg, ctx.iteration, int(a), check_ids if r == 0 else []
        )
        for r, (w, a, b) in enumerate(zip(pool, bounds[:-1], bounds[1:]))
    ]
    tracks, stats, offset = [], {}, 0
    for (got, st, logs), a in zip(workers.gather(pool, refs, "rollout"), bounds[:-1]):
        for msg in logs:
            ctx.log(msg)
        for t in got:
            t.prompt_index += int(a)
            t.track_id += offset
            if t.parent_track_id is not None:
                t.parent_track_id += offset
        offset += len(got)
        tracks += got
        for k, v in st.items():
            if isinstance(v, (int, float)):
                stats[k] = max(stats.get(k, 0), v) if k.endswith("_s") else stats.get(k, 0) + v
    stats["workers"] = n
    stats["worker_nodes"] = [workers.describe(w["where"]) for w in pool]
    return tracks, stats


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    prompts_file = inputs["prompts"] / "prompts.parquet"
    prompts = schemas.validate(pq.read_table(prompts_file), schemas.PROMPTS, prompts_file)
    batch = select_prompts(prompts, cfg.data.prompts_per_iteration, ctx.iteration, cfg.seed)
    tokenizer = load_tokenizer(inputs["policy"], cfg.model_trust_remote_code)
    encode = prompt_encoder(tokenizer, inputs["policy"], prompts_file)
    prompt_ids = [encode(t) for t in batch.column("prompt").to_pylist()]
    for i, ids in enumerate(prompt_ids):
        if len(ids) > cfg.data.max_prompt_tokens:
            pid = batch.column("prompt_id")[i].as_py()
            raise schemas.SchemaError(
                f"file {prompts_file}, column 'prompt', prompt_id {pid!r}: {len(ids)} tokens, more "
                f"than data.max_prompt_tokens={cfg.data.max_prompt_tokens}. Shorten the prompt or "
                "raise data.max_prompt_tokens."
            )
        if not ids:
            pid = batch.column("prompt_id")[i].as_py()
            raise schemas.SchemaError(
                f"file {prompts_file}, column 'prompt', prompt_id {pid!r}: "
                "the prompt tokenizes to nothing. Give it some text."
            )

    t0 = time.perf_counter()
    # The sync check's fixed sequence: the dataset's first prompt, the same every iteration.
    check_ids = encode(prompts.column("prompt")[0].as_py())
    if cfg.cluster.ray_address:
        tracks, stats = on_workers(inputs["policy"], prompt_ids, cfg, ctx, check_ids)
    else:
        tracks, stats = ENGINES.get(cfg.generate.engine).generate(
            inputs["policy"], prompt_ids, cfg, ctx, tokenizer=tokenizer, check_ids=check_ids
        )
    seconds = time.perf_counter() - t0
    tracks = canonical(tracks)

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
        "response": pa.array(
            tokenizer.batch_decode([t.response_ids for t in tracks], skip_special_tokens=True),
            pa.string(),
        ),
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
        "tokens_per_s": float(stats["generated_tokens"] / max(seconds, 1e-9)),
        # The engine's own counters and figures (KV copies, prefix-cache hits, weight sync).
        **{
            k: v
            for k, v in stats.items()
            if k not in ("generated_tokens", "forward_tokens", "steps")
        },
    }
    return {"rows": len(tracks), "metrics": metrics}


STAGE = Stage(
    name="generate",
    version=1,
    inputs=("prompts", "policy"),
    output="rollouts",
    reads=reads,
    packages=lambda cfg: ("torch", "transformers", *ENGINES.get(cfg.generate.engine).packages),
    # What only changes where or how fast an engine samples: read, not in the key.
    # (model_trust_remote_code: whether the folder's own code may run; that code is in the
    # policy's digest.)
    ignores=tuple(
        sorted(
            {
                "model_trust_remote_code",
                # Where the engines run (in this process or on Ray workers), and the
                # cluster's size: the same rollouts either way.
                "cluster.ray_address",
                "update.workers",
                *(k for n in ENGINES.names() for k in ENGINES.get(n).ignores),
            }
        )
    ),
    implementation=lambda cfg: f"generate.{cfg.generate.engine}",
    run=run,
    module=__name__,
    uses_iteration=True,
)
