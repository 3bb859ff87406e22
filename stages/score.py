"""Stage 2, score: add rewards to rollouts.

Each entry of `score.reward_funcs` is a built-in name or `module:function`. A reward
function follows TRL's contract: it is called with keyword arguments

    fn(completions=[str], prompts=[str], completion_ids=[[int]], **columns) -> list[float]

where `columns` are every other column of the rollouts (prompt columns such as `answer`
included), one list entry per row. `reward` is the weighted sum over functions
(`score.reward_weights`, default all 1.0); each function's raw values are kept in a
`reward_<name>` column. A function that returns the wrong number of values, or a NaN/inf
value, is an error naming the function and the row: NaN rewards cannot be trained on.

Built-ins are verifiable rewards: `exact_match` (the completion, stripped, equals the
`answer` column) and `numeric_match` (the last number in the completion equals `answer`
as a number, within 1e-6 relative).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.config import Config
from pipeline.registry import Registry, UnknownName
from pipeline.stage import Stage

REWARDS: Registry = Registry("reward function", "score.reward_funcs")


def reward_code(cfg: Config) -> dict:
    # A user function's whole module file is hashed too, so editing it (the function, a
    # helper or a module constant) reruns scoring.
    return {"reward_code": {name: _code_digest(name) for name in cfg.score.reward_funcs}}


def _answers(columns: dict) -> list[str]:
    if "answer" not in columns:
        raise ValueError("needs an 'answer' column in the prompt dataset (the reference answer)")
    return [str(a).strip() for a in columns["answer"]]


@REWARDS.register("exact_match")
def exact_match(completions: list[str], **columns) -> list[float]:
    answers = _answers(columns)
    return [float(c.strip() == a) for c, a in zip(completions, answers)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@REWARDS.register("numeric_match")
def numeric_match(completions: list[str], **columns) -> list[float]:
    answers = _answers(columns)
    out = []
    for c, a in zip(completions, answers):
        found = _NUMBER.findall(c.replace(",", ""))
        try:
            ok = bool(found) and abs(float(found[-1]) - float(a)) <= 1e-6 * max(1.0, abs(float(a)))
        except ValueError:
            ok = False
        out.append(float(ok))
    return out


def resolve(name: str):
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" not in name:
        raise UnknownName(f"unknown reward function {name!r} (score.reward_funcs); built-ins: "
                          f"{', '.join(REWARDS.names())}; or give module:function")
    module, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UnknownName(f"reward function {name!r}: cannot import module {module!r} ({e}); "
                          "is it on PYTHONPATH?") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UnknownName(f"reward function {name!r}: module {module!r} has no callable {attr!r}")
    return fn


def _code_digest(name: str) -> str:
    if name in REWARDS:
        return "builtin"
    import hashlib
    import inspect
    try:
        return hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return "unknown"


def column_name(name: str) -> str:
    return "reward_" + re.sub(r"[^0-9A-Za-z_]+", "_", name.split(":")[-1])


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    path = inputs["rollouts"] / "rollouts.parquet"
    table = schemas.validate(pq.read_table(path), schemas.ROLLOUTS, path)
    columns = {n: table.column(n).to_pylist() for n in table.column_names
               if n not in ("response", "response_ids")}
    completions = table.column("response").to_pylist()
    columns["prompts"] = columns.pop("prompt")
    columns["completion_ids"] = table.column("response_ids").to_pylist()
    weights = cfg.score.reward_weights or [1.0] * len(cfg.score.reward_funcs)
    total = np.zeros(table.num_rows)
    metrics = {}
    for name, w in zip(cfg.score.reward_funcs, weights):
        fn = resolve(name)
        try:
            values = fn(completions=completions, **columns)
        except ValueError as e:
            raise ValueError(f"reward function {name!r} on {path}: {e}") from None
        values = [np.nan if v is None else v for v in values]
        if len(values) != table.num_rows:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for "
                             f"{table.num_rows} completions in {path}; return one per completion")
        schemas.check_finite(values, f"{path} (reward function {name!r})", column_name(name))
        arr = np.asarray(values, dtype=np.float64)
        table = table.append_column(column_name(name), pa.array(arr))
        total += w * arr
        metrics[column_name(name)] = float(arr.mean())
    table = table.append_column("reward", pa.array(total))
    table = schemas.validate(table, schemas.SCORED, out_dir / "scored.parquet")
    pq.write_table(table, out_dir / "scored.parquet")

    # Summaries over round-0 tracks only: those are independent samples of the policy
    # (inheriting tracks share a prefix with their survivor).
    first = np.asarray(table.column("birth_round").to_pylist()) == 0
    lens = np.array([len(r) for r in table.column("response_ids").to_pylist()])[first]
    total = total[first]
    correct = total >= cfg.score.correct_threshold
    metrics.update({
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        "accuracy": float(correct.mean()),
        "mean_len_correct": float(lens[correct].mean()) if correct.any() else None,
        "mean_len_incorrect": float(lens[~correct].mean()) if (~correct).any() else None,
        "mean_response_len": float(lens.mean()),
        **within_prompt_gap(np.asarray(table.column("prompt_id").to_pylist())[first], lens,
                            correct),
    })
    return {"rows": table.num_rows, "metrics": metrics}


def within_prompt_gap(prompt_ids: np.ndarray, lens: np.ndarray, correct: np.ndarray) -> dict:
    """Mean length of incorrect minus correct responses *to the same prompt*, averaged over
    the prompts that have both: the length bias a group-relative loss can reward, with the
    mix of prompts (harder prompts often have longer answers) taken out."""
    _, g = np.unique(prompt_ids, return_inverse=True)
    n_ok = np.bincount(g, weights=correct)
    n_bad = np.bincount(g, weights=~correct)
    both = (n_ok > 0) & (n_bad > 0)
    if not both.any():
        return {"len_gap": None, "len_gap_prompts": 0}
    len_ok = np.bincount(g, weights=lens * correct)[both] / n_ok[both]
    len_bad = np.bincount(g, weights=lens * ~correct)[both] / n_bad[both]
    return {"len_gap": float((len_bad - len_ok).mean()), "len_gap_prompts": int(both.sum())}


STAGE = Stage(name="score", version=1, inputs=("rollouts",), output="scored",
              reads=lambda cfg: ("score.*",), key_extra=reward_code,
              implementation=lambda cfg: "score.rewards", run=run, module=__name__)
