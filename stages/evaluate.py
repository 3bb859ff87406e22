"""Stage eval: avg@k and pass@k of a policy on held-out prompts.

Reads a held-out prompt dataset (`heldout`: `eval.data`, materialised like the training
prompts, so a chat or `datasets` source works the same way) and a policy folder. It takes
the first `eval.max_prompts` prompts (all with 0) and

1. samples `eval.k` independent responses per prompt by running the generate stage itself
   with `group_size = k` and `rounds = 1`, at `eval.temperature`, with a budget of
   `eval.max_new_tokens` (0 = `generate.max_new_tokens`): the run's engine, tokenizer
   handling (chat template) and prompt checks, nothing re-implemented. Pairs need an even
   group, so an odd k samples k + 1 and drops each prompt's last sample (chosen by position,
   not by outcome, so the rest stay an unbiased sample);
2. scores them by running the score stage itself: the run's reward functions, weights and
   reward models;
3. writes `eval.parquet`, one row per (prompt, sample), schema `EVAL` below.

A response is correct when its reward is at least `score.correct_threshold`. With n = k
samples of a prompt, c of them correct:

    avg@k  = mean over prompts of c / n                        (the paper's avg@32)
    pass@j = mean over prompts of 1 - C(n - c, j) / C(n, j)     for j = 1, 2, 4, ..., k

the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", eq. 1; `pass_at_k`), computed in their numerically stable product form. pass@k with
n = k is "some sample is correct"; pass@1 equals avg@k. Also reported: the mean length
(tokens) of correct and of incorrect responses, and the fraction cut off by the budget.

The output depends on the policy, the prompts and the settings above, not on the iteration:
evaluating the same weights again (a rerun, `eqlen eval` on a run's policy) is a cache hit.
Prompts are sampled in up to 20 chunks (each a generate call, with its own seed offset) so
that a progress bar can count prompts; that bar shows on a terminal only.

Departure from the paper: none in the estimators; the sampling settings other than the
temperature and the budget (top_p, top_k, the engine) are the run's `generate.*`.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline import progress
from pipeline.config import Config, leaves
from pipeline.errors import EqLenError
from pipeline.stage import ConfigView, Stage, UndeclaredRead, expand, get
from stages import generate, score

EVAL = schemas.Schema(
    "eval",
    (
        schemas.Column("prompt_id", schemas.STR, "Id of the held-out prompt."),
        schemas.Column(
            "sample", schemas.I32, "Index of the response among the prompt's k samples (0..k-1)."
        ),
        schemas.Column("response", schemas.STR, "Decoded response text (special tokens skipped)."),
        schemas.Column(
            "response_ids",
            schemas.IDS,
            "Response token ids, ending with EOS unless finish_reason is `length`.",
            len_of="response_len",
        ),
        schemas.Column("response_len", schemas.I32, "Tokens in the response, EOS included."),
        schemas.Column(
            "finish_reason", schemas.STR, "`eos`, or `length` (hit the eval's token budget)."
        ),
        schemas.Column(
            "reward",
            schemas.F64,
            "Weighted sum of the reward columns, as the score stage computes it.",
        ),
        schemas.Column("correct", pa.bool_(), "reward >= score.correct_threshold."),
    ),
    "One row per held-out prompt and sample. The prompt's own columns (`prompt`, `answer`, "
    "...) and the score stage's `reward_<function>` columns are kept.",
)

EVAL_NAMES = {c.name for c in EVAL.columns}

# generate.* settings the eval sets itself (from eval.*), so they are not in its key.
OVERRIDDEN = {
    "generate.group_size": "eval.k (rounded up to even)",
    "generate.rounds": "1: independent samples",
    "generate.temperature": "eval.temperature",
    "generate.max_new_tokens": "eval.max_new_tokens (read when that is 0)",
    "data.prompts_per_iteration": "the prompts of one chunk",
    "generate.vllm_sync_check": "off: a check of training's weight sync, not of the eval",
}
# Columns of the sampled rollouts that only describe pairs and rounds: not kept.
LINEAGE = ("iteration", "prompt_ids", "pair_id", "parent_track_id", "birth_round", "own_start")
MAX_CHUNKS = 20  # generate calls per eval: progress granularity vs per-call model loading


class EvalError(EqLenError, ValueError):
    """Held-out evaluation settings that cannot work; the message says which and why."""


def check_config(cfg: Config) -> None:
    """The eval.* values the stage relies on (config validation does not cover them)."""
    e = cfg.eval
    if e.k < 1:
        raise EvalError(f"eval.k={e.k}: sample at least one response per prompt (k >= 1)")
    if e.temperature <= 0:
        raise EvalError(f"eval.temperature={e.temperature} must be > 0 (the engines sample)")
    if e.max_new_tokens < 0 or e.max_prompts < 0:
        raise EvalError("eval.max_new_tokens and eval.max_prompts must be >= 0 (0 = default)")
    if e.every < 0:
        raise EvalError(f"eval.every={e.every} must be >= 0 (0 = never)")
    if e.every > 0 and not e.data:
        raise EvalError(
            f"eval.every={e.every} needs held-out prompts: set eval.data to a prompt file "
            "(same forms as data.prompts), or eval.every=0"
        )


def reads(cfg: Config) -> tuple[str, ...]:
    own = ["eval.k", "eval.temperature", "eval.max_new_tokens", "eval.max_prompts"]
    if cfg.eval.max_new_tokens == 0:
        own.append("generate.max_new_tokens")
    # Whatever generate and score read decides the eval's rows too, except what it sets.
    nested = [k for k in expand(generate.STAGE.reads(cfg), cfg) if k not in OVERRIDDEN]
    return (*own, *nested, *expand(score.STAGE.reads(cfg), cfg))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021: 1 - C(n-c, k) / C(n, k), the probability that k of the n samples
    drawn without replacement include a correct one, as 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    (no large binomials). Needs 1 <= k <= n."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... below k, then k: the pass@j columns reported."""
    out = [j for j in (2**i for i in range(k.bit_length())) if j < k]
    return [*out, k]


def summarize(table: pa.Table, k: int) -> dict:
    """avg@k, pass@j and the length figures of an eval table (see the module docstring)."""
    pid = np.asarray(table.column("prompt_id").to_pylist())
    correct = np.asarray(table.column("correct").to_pylist(), dtype=bool)
    lens = np.asarray(table.column("response_len").to_pylist(), dtype=np.float64)
    _, group = np.unique(pid, return_inverse=True)
    n = np.bincount(group)
    c = np.bincount(group, weights=correct).astype(int)
    out = {"k": k, "n_prompts": int(len(n)), "n_samples": int(table.num_rows)}
    out[f"avg@{k}"] = float(np.mean(c / n))
    for j in pass_ks(k):
        out[f"pass@{j}"] = float(np.mean([pass_at_k(int(a), int(b), j) for a, b in zip(n, c)]))
    out["mean_len_correct"] = float(lens[correct].mean()) if correct.any() else None
    out["mean_len_incorrect"] = float(lens[~correct].mean()) if (~correct).any() else None
    out["mean_response_len"] = float(lens.mean())
    out["reward_mean"] = float(np.mean(table.column("reward").to_pylist()))
    out["truncated_fraction"] = float(
        np.mean([r == "length" for r in table.column("finish_reason").to_pylist()])
    )
    return out


class _Context:
    """What the nested generate and score calls see: a chunk index as the iteration (their
    seed offset) and a log that keeps the engines' per-batch lines off the progress bar."""

    progress = False  # the eval's own bar counts prompts

    def __init__(self, iteration: int, stage: str = "eval"):
        self.iteration, self.stage = iteration, stage

    def log(self, msg: str) -> None:
        pass


def _plain(view) -> Config:
    """A Config holding the values this stage may read (its declared keys); the others stay
    at their defaults, and the nested stages never read them: their declarations are part
    of this one (`reads`), apart from the keys in OVERRIDDEN, which `run` sets."""
    out = Config()
    for key, *_ in leaves(out):
        try:
            value = get(view, key)
        except UndeclaredRead:
            continue
        parent, _, name = key.rpartition(".")
        setattr(get(out, parent) if parent else out, name, copy.deepcopy(value))
    return out


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    prompts_file = inputs["heldout"] / "prompts.parquet"
    prompts = schemas.validate(pq.read_table(prompts_file), schemas.PROMPTS, prompts_file)
    e = cfg.eval
    if e.max_prompts:
        prompts = prompts.slice(0, e.max_prompts)
    k = e.k

    sub = _plain(cfg)
    g = sub.generate
    g.group_size = k + k % 2
    g.rounds = 1
    g.temperature = e.temperature
    g.max_new_tokens = e.max_new_tokens or cfg.generate.max_new_tokens
    g.batch_tracks = max(g.batch_tracks, g.group_size)
    g.vllm_sync_check = False
    n = prompts.num_rows
    chunk = max(1, g.batch_tracks // g.group_size, math.ceil(n / MAX_CHUNKS))

    parts, tokens, next_ids, t0 = [], 0, (0, 0), time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="eqlen-eval-") as tmp,
        progress.bar(n, "eval", "prompt", ctx) as bar,
    ):
        tmp = Path(tmp)
        for c, start in enumerate(range(0, n, chunk)):
            part = prompts.slice(start, chunk)
            (tmp / "prompts").mkdir(exist_ok=True)
            pq.write_table(part, tmp / "prompts" / "prompts.parquet")
            sub.data.prompts_per_iteration = part.num_rows
            out = tmp / f"rollouts-{c}"
            out.mkdir()
            try:
                res = generate.STAGE.run(
                    {"prompts": tmp / "prompts", "policy": inputs["policy"]},
                    out,
                    ConfigView(sub, generate.STAGE.allowed(sub), "eval"),
                    _Context(c),
                )
            except schemas.SchemaError as err:
                raise schemas.SchemaError(f"held-out prompts ({prompts_file}): {err}") from None
            tokens += res["metrics"]["tokens_generated"]
            got = _keep_k(pq.read_table(out / "rollouts.parquet"), k, next_ids)
            next_ids = (pc.max(got["track_id"]).as_py() + 1, pc.max(got["pair_id"]).as_py() + 1)
            parts.append(got)
            bar.update(part.num_rows)
        seconds = time.perf_counter() - t0

        rollouts = pa.concat_tables(parts)
        (tmp / "rollouts").mkdir()
        pq.write_table(rollouts, tmp / "rollouts" / "rollouts.parquet")
        (tmp / "scored").mkdir()
        score.STAGE.run(
            {"rollouts": tmp / "rollouts"},
            tmp / "scored",
            ConfigView(sub, score.STAGE.allowed(sub), "eval"),
            _Context(0),
        )
        scored = pq.read_table(tmp / "scored" / "scored.parquet")

    drop = (*LINEAGE, "track_id", "logprobs")
    table = scored.drop_columns([c for c in drop if c in scored.column_names])
    table = table.append_column(
        "response_len", pc.list_value_length(table.column("response_ids")).cast(pa.int32())
    )
    correct = pc.greater_equal(table.column("reward"), cfg.score.correct_threshold)
    table = table.append_column("correct", correct)
    # Rows in the held-out file's order (generate shuffles its prompts), then by sample.
    position = {p: i for i, p in enumerate(prompts.column("prompt_id").to_pylist())}
    order = [position[p] for p in table.column("prompt_id").to_pylist()]
    table = table.append_column("_position", pa.array(order, pa.int64()))
    table = table.sort_by([("_position", "ascending"), ("sample", "ascending")])
    table = table.select(
        [*(c.name for c in EVAL.columns), *(c for c in table.column_names if c not in EVAL_NAMES)]
    ).drop_columns(["_position"])
    table = schemas.validate(table, EVAL, out_dir / "eval.parquet")
    pq.write_table(table, out_dir / "eval.parquet")

    metrics = summarize(table, k)
    metrics["tokens_per_s"] = tokens / max(seconds, 1e-9)
    ctx.log(
        f"  eval: {metrics['n_prompts']} prompts x {k}: avg@{k} {metrics[f'avg@{k}']:.3f}, "
        f"pass@{k} {metrics[f'pass@{k}']:.3f}"
    )
    return {"rows": table.num_rows, "metrics": metrics}


def _keep_k(rollouts: pa.Table, k: int, first_ids: tuple[int, int]) -> pa.Table:
    """Each prompt's first k tracks (by track id: an odd k drops the extra one), with their
    index as `sample`; track and pair ids shifted to start at `first_ids`, so that they stay
    unique over the chunks (the score stage names rows by them in its errors)."""
    rollouts = rollouts.sort_by("track_id")
    pid = rollouts.column("prompt_id").to_pylist()
    seen: dict[str, int] = {}
    sample = []
    for p in pid:
        sample.append(seen.get(p, 0))
        seen[p] = sample[-1] + 1
    rollouts = rollouts.append_column("sample", pa.array(sample, pa.int32()))
    rollouts = rollouts.filter(pc.less(rollouts.column("sample"), k))
    for name, first in zip(("track_id", "pair_id"), first_ids):
        i = rollouts.column_names.index(name)
        ids = pc.add(rollouts.column(name), pa.scalar(first, pa.int64()))
        rollouts = rollouts.set_column(i, name, ids)
    return rollouts


STAGE = Stage(
    name="eval",
    version=1,
    inputs=("heldout", "policy"),
    output="evaluation",
    reads=reads,
    # What only changes where or how fast the nested stages run: read, not in the key.
    ignores=tuple(sorted({*generate.STAGE.ignores, *score.STAGE.ignores})),
    packages=lambda cfg: (*generate.STAGE.packages(cfg), *score.STAGE.packages(cfg)),
    key_extra=lambda cfg: {
        "generate": generate.STAGE.key_extra(cfg),
        "score": score.STAGE.key_extra(cfg),
    },
    implementation=lambda cfg: f"eval.{cfg.generate.engine}",
    run=run,
    module=__name__,
)
