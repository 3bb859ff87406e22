"""Data-parallel updates: `update.workers` ranks as Ray actors with torch.distributed.

Why our own actors and not Ray Train's TorchTrainer: the ranks must live for the whole run
(one process group, models loaded per iteration from the new policy folder), each
iteration is one call that returns the rank's records, and the rest of the pipeline
already keeps its Ray actors in pools (stages/workers.py). TorchTrainer's run-per-fit
model, its own checkpoint and result directories and its worker-group restarts would sit
beside our cache rather than under it; plain actors plus `init_process_group` are what it
does underneath.

One optimizer step on N ranks is the step of one process, exactly (tested to 1e-5
relative in float32), because the split happens after the loss aggregation's weights are
fixed on the whole mini-batch (`update.backward_sums`): rank r forwards every N-th
forwarded member of the mini-batch, and the gradient is the sum over ranks.

- `ddp`: every rank holds the whole model; after a mini-batch's micro-batches the
  accumulated gradients are summed with one all-reduce (what DDP's `no_sync`
  accumulation does, without per-micro-batch hooks or unused-parameter bookkeeping),
  so every rank clips and steps identically.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer and the root
  shards parameters, gradients and optimizer state; FSDP reduce-scatters gradients as the
  mean over ranks, so each rank's loss is scaled by the number of ranks to make that mean
  the sum (a divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks); every
  rank runs as many micro-batches as the busiest one (zero-weight repeats), since FSDP's
  collectives run in each forward and backward.

Backends: gloo on CPU, NCCL on GPU (one GPU per rank). The policy written is a normal
Hugging Face folder (rank 0 saves it; under FSDP from the gathered full state dict), and
`optimizer.pt` is always the one-process format (`torch.optim.Optimizer.state_dict()`,
parameters in `named_parameters()` order), gathered on rank 0 under FSDP: the next
iteration resumes it with any number of ranks, in-process included.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster import ClusterError, node_info
from pipeline.lazy import lazy_import

torch = lazy_import("torch")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the update's process group."""

    rank: int
    world: int
    sharding: str  # ddp | fsdp

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp" and self.world > 1


# --- inside a rank ---------------------------------------------------------------------


def shard(model, ranks: Ranks):
    """FSDP2 on every decoder layer (the modules a transformers model lists in
    `_no_split_modules`), then the root."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    return model


def all_reduce_grads(params) -> None:
    """Sum the accumulated gradients over ranks in one flat all-reduce (ddp)."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sums(sums: dict) -> dict:
    """The ranks' `backward_sums` added up."""
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def full_norm(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_optimizer(model, opt, path: Path, ranks: Ranks, device) -> None:
    """Load `optimizer.pt` (the one-process format) into a sharded optimizer. Only rank 0
    reads the file; each tensor is broadcast and every rank keeps its shard
    (`broadcast_from_rank0`), so a node's host memory holds one full copy, not one per
    rank (a 7B model's AdamW state is about 61 GB)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = {}
    if ranks.rank == 0:
        saved = torch.load(path, map_location="cpu")
        names = _trainable_names(model)
        full = {
            "state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
    set_optimizer_state_dict(
        model,
        opt,
        full,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def full_state(model, opt) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict in the one-process format), gathered on
    rank 0 from the shards (a collective: every rank calls it; others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if not msd:
        return {}, {}
    index = {n: i for i, n in enumerate(_trainable_names(model))}
    state = {index[n]: v for n, v in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return msd, {"state": state, "param_groups": groups}


class UpdateRank:
    """One data-parallel rank (a Ray actor): joins the process group once, then trains one
    update stage per call (stages/update.py `train`)."""

    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world = rank, world
        torch.set_num_threads(threads)
        os.environ["EQLEN_THREADS"] = str(threads)

    def where(self) -> dict:
        return {"rank": self.rank, **node_info(), "cuda": torch.cuda.is_available()}

    def address(self) -> tuple[str, int]:
        """Rank 0: an address and free port for the process group's rendezvous."""
        ip = node_info().get("node_ip") or "127.0.0.1"
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, ip: str, port: int) -> str:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{ip}:{port}",
            rank=self.rank,
            world_size=self.world,
            timeout=datetime.timedelta(minutes=30),
        )
        return backend

    def missing(self, paths: list[str]) -> list[str]:
        return [p for p in paths if not Path(p).exists()]

    def train(self, inputs: dict, out_dir: str, cfg, iteration: int, sharding: str):
        from stages import update

        logs: list[str] = []
        ranks = Ranks(self.rank, self.world, sharding)
        res = update.train(
            update.prepare(Path(inputs["units"]), cfg),
            {k: Path(v) for k, v in inputs.items()},
            Path(out_dir),
            cfg,
            iteration,
            log=logs.append if self.rank == 0 else (lambda m: None),
            ranks=ranks,
        )
        return res, logs


# --- the driver ------------------------------------------------------------------------


def rank_pool(cfg, log) -> list[dict]:
    """The run's `update.workers` ranks, joined in one process group (kept for the run)."""
    import ray

    from stages import workers

    n = cfg.update.workers
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    res = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
    key = ("update", n, tuple(sorted(res.items())))
    if key in workers._POOLS:
        return workers._POOLS[key]
    cls = ray.remote(**res)(UpdateRank)
    threads = 1 if gpu else max(1, (os.cpu_count() or 1) // n)
    actors = [cls.remote(r, n, threads) for r in range(n)]
    try:
        wheres = ray.get([a.where.remote() for a in actors], timeout=600)
        ip, port = ray.get(actors[0].address.remote())
        backends = ray.get([a.join.remote(ip, port) for a in actors], timeout=600)
    except Exception as e:  # noqa: BLE001 - any start failure is the user's to see
        workers._kill([{"actor": a} for a in actors])
        raise ClusterError(
            f"update.workers={n}: the update ranks did not start or join their process group "
            f"({type(e).__name__}: {e}). Check the cluster's free resources (each rank takes "
            f"{res}) and that the nodes reach each other."
        ) from None
    pool = [{"actor": a, "where": w} for a, w in zip(actors, wheres)]
    for w in wheres:
        log(f"  update: rank {w['rank']}/{n} on {workers.describe(w)} ({backends[0]})")
    workers._POOLS[key] = pool
    return pool


def train_on_ranks(inputs: dict[str, Path], out_dir: Path, cfg, ctx) -> dict:
    """The update's `train` on the rank pool; rank 0's result with every rank's records."""
    from pipeline import cluster
    from stages import workers

    cluster.connect(cfg.cluster.ray_address, cfg.generate.workers + cfg.update.workers)
    pool = rank_pool(cfg, ctx.log)
    paths = [str(p) for p in inputs.values()] + [str(out_dir)]
    workers.check_paths(pool, paths, "update")
    refs = [
        w["actor"].train.remote(
            {k: str(v) for k, v in inputs.items()},
            str(out_dir),
            cfg,
            ctx.iteration,
            cfg.update.sharding,
        )
        for w in pool
    ]
    results = workers.gather(pool, refs, "update", collective=True)
    for msg in results[0][1]:
        ctx.log(msg)
    res = results[0][0]
    res["record"] = [r for got, _ in results for r in got["record"]]
    res["workers"] = len(pool)
    res["worker_nodes"] = [workers.describe(w["where"]) for w in pool]
    return res
