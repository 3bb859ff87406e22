"""Workers on Ray: the rollout workers of `generate.workers` and their pools.

A pool is a list of Ray actors of one kind and shape, created on first use and kept until
the run ends (`close_pools`, called by the runner), so an engine starts once per run: a
vLLM worker keeps its live engine between iterations and syncs each new policy into it
(`reload_weights` + prefix-cache reset, stages/vllm_engine.py), never a restart.

`RolloutWorker.generate` runs the configured engine (the same `ENGINES` record as in
process) on its shard of the prompts and returns the tracks; `stages/generate.py` shards
and merges. Worker placement: each actor takes one logical CPU, and on a GPU cluster the
GPUs its engine needs (vLLM: `generate.vllm_tensor_parallel_size`; hf: one).

Failures are named: a worker that dies fails the stage with a `ClusterError` naming the
worker, its node and pid (the pool is dropped, so the next run starts fresh ones and
resumes from the cache); a worker that cannot see an input path (no shared filesystem)
fails before any sampling.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pipeline.cluster import ClusterError, node_info

_POOLS: dict[tuple, list[dict]] = {}  # key -> [{"actor", "where"}]


class RolloutWorker:
    """One rollout engine in its own process (a Ray actor; see the module docstring)."""

    def __init__(self, rank: int, threads: int):
        import torch

        self.rank = rank
        torch.set_num_threads(threads)
        os.environ["EQLEN_THREADS"] = str(threads)
        self._tokenizers: dict[str, Any] = {}

    def where(self) -> dict:
        import torch

        return {"rank": self.rank, **node_info(), "cuda": torch.cuda.is_available()}

    def missing(self, paths: list[str]) -> list[str]:
        """The paths this worker's node cannot see."""
        return [p for p in paths if not Path(p).exists()]

    def generate(
        self, policy_dir: str, prompt_ids, cfg, iteration: int, prompt_offset: int, check_ids
    ):
        import stages.generate  # noqa: F401  (registers the engines in this process)
        from pipeline.models import load_tokenizer
        from stages.engine import ENGINES

        logs: list[str] = []

        class Ctx:  # what an engine reads of the stage's context
            progress = False

            def __init__(self):
                self.iteration = iteration

            def log(self, msg: str) -> None:
                logs.append(msg)

        if policy_dir not in self._tokenizers:
            self._tokenizers = {policy_dir: load_tokenizer(policy_dir, cfg.model_trust_remote_code)}
        tracks, stats = ENGINES.get(cfg.generate.engine).generate(
            Path(policy_dir),
            prompt_ids,
            cfg,
            Ctx(),
            tokenizer=self._tokenizers[policy_dir],
            check_ids=check_ids,  # worker 0's only: one sync check per iteration
            prompt_offset=prompt_offset,
        )
        return tracks, stats, logs


def _resources(cfg) -> dict:
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    g = cfg.generate
    gpus = (g.vllm_tensor_parallel_size if g.engine == "vllm" else 1) if gpu else 0
    return {"num_cpus": 1, "num_gpus": gpus}


def rollout_pool(cfg, log) -> list[dict]:
    """The run's `generate.workers` rollout workers (started on first use, then reused)."""
    import ray

    n, res = cfg.generate.workers, _resources(cfg)
    key = ("rollout", n, cfg.generate.engine, tuple(sorted(res.items())))
    if key in _POOLS:
        return _POOLS[key]
    for other in [k for k in _POOLS if k[0] == "rollout"]:  # another shape: replace it
        _kill(_POOLS.pop(other))
    cls = ray.remote(**res)(RolloutWorker)
    threads = max(1, (os.cpu_count() or 1) // n) if not res["num_gpus"] else 1
    actors = [cls.options(name=None).remote(rank, threads) for rank in range(n)]
    try:
        wheres = ray.get([a.where.remote() for a in actors], timeout=600)
    except Exception as e:  # noqa: BLE001 - any start failure is the user's to see
        _kill([{"actor": a} for a in actors])
        raise ClusterError(
            f"generate.workers={n}: the rollout workers did not start ({type(e).__name__}: "
            f"{e}). Check the cluster's free resources (each worker takes {res})."
        ) from None
    pool = [{"actor": a, "where": w} for a, w in zip(actors, wheres)]
    for w in wheres:
        log(f"  generate: rollout worker {w['rank']} on {describe(w)}")
    _POOLS[key] = pool
    return pool


def describe(where: dict) -> str:
    """`host (node ip) pid N, cuda` for the run's log and `eqlen show`."""
    node = where.get("node_ip", "")
    dev = f"GPU {','.join(where['gpus'])}" if where.get("gpus") else "CPU"
    return f"{where['host']} ({node}) pid {where['pid']}, {dev}"


def check_paths(pool: list[dict], paths: list[str], what: str) -> None:
    """Every worker sees `paths` (the shared filesystem the README asks for)."""
    import ray

    for w, missing in zip(pool, ray.get([w["actor"].missing.remote(paths) for w in pool])):
        if missing:
            raise ClusterError(
                f"{what} worker {w['where']['rank']} on {describe(w['where'])} cannot see "
                f"{missing[0]}: every node must see cache_dir and the run directory at the "
                "same path (a shared filesystem); mount it there, or set cache_dir to a "
                "shared folder."
            )


def gather(pool: list[dict], refs: list, what: str, *, collective: bool = False) -> list:
    """The results of one call per worker, in pool order; a dead worker is a ClusterError
    naming it. Results are taken as they come (`ray.wait`), not in order. `collective`
    (ranks of one process group): when a rank dies the others fail in their next
    collective, and the error to show is the death, not the collective's; when a rank
    fails on its own, its peers wait in a collective for it, so the pool is dropped."""
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError

    def died(w, e) -> ClusterError:
        close_pools()  # the pool is broken: the next run starts fresh workers
        first = (str(e).splitlines() or [""])[0][:200]
        return ClusterError(
            f"{what} worker {w['where']['rank']} on {describe(w['where'])} died "
            f"({type(e).__name__}: {first}). Nothing of this stage was written; run again "
            "to resume from the cache."
        )

    index = {ref: i for i, ref in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        w = pool[index[ref]]
        try:
            out[index[ref]] = ray.get(ref)
        except RayTaskError as e:
            # The stage's own error (a bad prompt, out of memory), unless a peer died and
            # took the collective down: give the others a moment to say so.
            if collective and pending:
                ready, stuck = ray.wait(pending, num_returns=len(pending), timeout=15)
                for other in ready:
                    try:
                        ray.get(other)
                    except RayActorError as dead:
                        raise died(pool[index[other]], dead) from None
                    except RayError:
                        pass
                if stuck:  # peers waiting in a collective for the one that failed
                    close_pools()
            raise e.as_instanceof_cause() from None
        except RayError as e:  # the actor, its node or its result is gone
            raise died(w, e) from None
    return out


def _kill(pool: list[dict]) -> None:
    import ray

    for w in pool:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(w["actor"])


def close_pools() -> None:
    """End every pool of this process (the run's end, or a broken pool)."""
    if not _POOLS:
        return
    for pool in _POOLS.values():
        _kill(pool)
    _POOLS.clear()
