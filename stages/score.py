"""Stage 2, score: add rewards to rollouts.

(The reward contract and its error reporting; the built-in rewards and the reward models
live in stages/rewards.py.)

Each entry of `score.reward_funcs` is a built-in name or `module:function`. A reward
function follows TRL's contract: it is called with keyword arguments

    fn(completions=..., prompts=..., completion_ids=[[int]], **columns) -> list[float]

where `columns` are every other column of the rollouts (prompt columns such as `answer`
included), one list entry per row. The completion text is the rollouts' `response`. With
string prompts, `prompts` and `completions` are lists of strings. With conversational
prompts (a `prompt` column of `list<struct<role, content>>`, TRL's conversational format),
`prompts` is the list of message lists and each completion is one assistant message,
`completions=[[{"role": "assistant", "content": text}], ...]`, exactly as TRL's
GRPOTrainer passes them (`rewards.completion_text(c)` gives the text of either form).

`reward` is the weighted sum over functions and then reward models
(`score.reward_weights`: one weight per function followed by one per model, default all
1.0); each function's raw values are kept in a `reward_<name>` column
(`reward_<module>_<name>` for functions of one name from different modules, `a:fn` and
`b:fn`). Every failure of a reward function is a `RewardError` (exit code 2) naming the
function: an exception it raises (with its type, message, source line and the first row
that fails alone), a column it looks up that the rollouts lack (listing those they have),
a wrong number of values, a value that is not a number, NaN or inf (NaN rewards cannot be
trained on). `check_reward` is the preflight's trial call of the same contract on
placeholder rows in the data's own form (flows/preflight.py).

Built-ins (stages/rewards.py), each 1.0 or 0.0 and each taking either completion form:
`exact_match` (the completion, stripped, equals the `answer` column), `numeric_match` (the
last number in the completion equals `answer` as a number, within 1e-6 relative),
`math_verify` (the completion's answer is mathematically equal to `answer` by the
math-verify library: `\\boxed{}`, LaTeX, plain numbers; a GSM8K `#### 72` answer is read
after its marker; a gold answer that does not parse scores 0.0) and `boxed_format` (exactly
one non-empty `\\boxed{...}` with balanced braces).

Reward models: each folder of `score.reward_models` (a local
`AutoModelForSequenceClassification` with one output and its tokenizer) is loaded once per
stage run on `score.device`, scores every row in batches of `score.reward_model_batch_size`
(`logits[:, 0]` of the prompt and completion as one text, a chat template for
conversational prompts, as TRL does; `rewards.score_with_model`) and gives the column
`reward_<folder name>`, after the functions' columns. torch and transformers are imported
only then: a cached run imports neither.

The cache key covers a user function's whole module file (`_code_digest`), so editing a
helper or a module constant reruns scoring, not only editing the function itself; the
content of every reward model folder (`rewards.model_digest`); and the versions of
math-verify (with its parser and sympy) when `math_verify` is used, and of torch and
transformers when reward models are. `score.device` and `score.reward_model_batch_size`
are not in the key (`ignores`): the same rows on another device or in other batches score
the same up to float rounding (padding is on the right and masked; only matmul shapes and
kernels differ, about 1e-6 in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.config import Config, ScoreConfig
from pipeline.errors import EqLenError
from pipeline.registry import UnknownName
from pipeline.stage import Stage
from stages import rewards
from stages.rewards import (  # noqa: F401 - the built-ins, importable from here as before
    REWARDS,
    RewardModelError,
    boxed_format,
    completion_text,
    exact_match,
    math_verify_reward,
    numeric_match,
)

# Config keys that cannot change the output (see the module docstring): left out of the key.
IGNORES = ("score.device", "score.reward_model_batch_size")
MATH_VERIFY_PACKAGES = ("math-verify", "latex2sympy2_extended", "sympy")


def reward_code(cfg: Config) -> dict:
    # A user function's whole module file is hashed too, so editing it (the function, a
    # helper or a module constant) reruns scoring; a reward model's whole folder likewise.
    out = {"reward_code": {name: _code_digest(name) for name in cfg.score.reward_funcs}}
    if cfg.score.reward_models:
        out["reward_models"] = rewards.model_key(list(cfg.score.reward_models))
    return out


def reads(cfg: Config) -> tuple[str, ...]:
    return tuple(
        f"score.{f.name}"
        for f in dataclasses.fields(ScoreConfig)
        if f"score.{f.name}" not in IGNORES
    )


def packages(cfg: Config) -> tuple[str, ...]:
    out = MATH_VERIFY_PACKAGES if "math_verify" in cfg.score.reward_funcs else ()
    return out + (("torch", "transformers") if cfg.score.reward_models else ())


class RewardError(EqLenError, ValueError):
    """A reward function that cannot be used as configured or fails on the rollouts; the
    message names the function, the row and what to do."""


def resolve(name: str):
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" not in name:
        raise UnknownName(
            f"unknown reward function {name!r} (score.reward_funcs); built-ins: "
            f"{', '.join(REWARDS.names())}; or give module:function"
        )
    module, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UnknownName(
            f"reward function {name!r}: cannot import module {module!r} ({e}); is it on PYTHONPATH?"
        ) from None
    except Exception as e:  # the module's own code failed while importing
        raise UnknownName(
            f"reward function {name!r}: importing module {module!r} failed with "
            f"{type(e).__name__}: {e}{_where(e)}. Fix the module."
        ) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        have = sorted(
            k for k, v in vars(mod).items() if inspect.isfunction(v) and not k.startswith("_")
        )
        raise UnknownName(
            f"reward function {name!r}: module {module!r} has no callable {attr!r}"
            + (f"; its functions: {', '.join(have[:12])}" if have else "")
        )
    return fn


def _where(e: BaseException) -> str:
    """' (file:line)' of the innermost frame of e's traceback (a SyntaxError's own spot)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({e.filename}:{e.lineno})"
    tb = traceback.extract_tb(e.__traceback__)
    return f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def _code_digest(name: str) -> str:
    """Digest of the code a reward function runs: the whole source file of its module (and
    of the module it is defined in, if it is re-exported), so editing a helper or a module
    constant reruns scoring, not only editing the function. Built-ins: 'builtin'."""
    if name in REWARDS:
        return "builtin"
    fn = resolve(name)
    h, files = hashlib.sha256(), []
    for mod in (sys.modules.get(name.partition(":")[0]), inspect.getmodule(fn)):
        try:
            f = inspect.getsourcefile(mod) if mod is not None else None
        except TypeError:  # a built-in or extension module
            f = None
        if f and f not in files and Path(f).is_file():
            files.append(f)
    try:
        for f in files:
            h.update(Path(f).read_bytes())
        if not files:
            h.update(inspect.getsource(fn).encode())
    except (OSError, TypeError):
        return "unknown"
    return h.hexdigest()[:16]


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", text)


def column_name(name: str, names: list[str] | None = None) -> str:
    """The `reward_<function>` column of reward function `name`. Given all of
    `score.reward_funcs` as `names`, functions that share a name across modules
    (`a:fn`, `b:fn`) get their module in it: `reward_a_fn`, `reward_b_fn`."""
    if names is not None:
        return column_names(names)[name]
    return "reward_" + _safe(name.split(":")[-1])


def column_names(names: list[str]) -> dict[str, str]:
    """{entry of score.reward_funcs: its column}; an entry listed twice is an error."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RewardError(
            f"score.reward_funcs lists {', '.join(map(repr, twice))} more than "
            "once; give each function once (score.reward_weights weighs it)"
        )
    base = {n: column_name(n) for n in names}
    out = {}
    for n in names:
        clash = [m for m in names if base[m] == base[n]]
        out[n] = "reward_" + _safe(n.replace(":", "_")) if len(clash) > 1 and ":" in n else base[n]
    seen: dict[str, int] = {}
    for n in names:  # still equal after adding the module (a.b:f, a_b:f): number them
        c = out[n]
        seen[c] = seen.get(c, 0) + 1
        if seen[c] > 1:
            out[n] = f"{c}_{seen[c]}"
    return out


def is_conversational(table: pa.Table) -> bool:
    """Whether the table's `prompt` column holds conversational prompts (lists of messages)."""
    return rewards.is_conversational_type(table.schema.field("prompt").type)


def reward_columns(table: pa.Table) -> tuple[list, dict[str, list]]:
    """(completions, keyword columns) of the rollouts, as reward functions receive them:
    completions as strings, or as one assistant message each when the prompts are
    conversational (TRL's form)."""
    columns = {
        n: table.column(n).to_pylist()
        for n in table.column_names
        if n not in ("response", "response_ids")
    }
    columns["prompts"] = columns.pop("prompt")
    columns["completion_ids"] = table.column("response_ids").to_pylist()
    texts = table.column("response").to_pylist()
    return rewards.as_completions(texts, is_conversational(table)), columns


def placeholder_columns(prompts: pa.Table, rows: int = 2) -> tuple[list, dict[str, list]]:
    """(completions, columns) shaped as `run` passes them, for the first `rows` prompts with
    empty completions (empty assistant messages for conversational prompts): what the
    preflight's trial call of a reward function gets."""
    head = prompts.slice(0, rows)
    n = head.num_rows
    columns = {c: head.column(c).to_pylist() for c in head.column_names}
    for col in schemas.ROLLOUTS.columns:
        if col.name in columns or col.name in ("response", "response_ids"):
            continue
        if col.nullable:
            value = None
        elif pa.types.is_list(col.type):
            value = []
        elif pa.types.is_string(col.type):
            value = "eos" if col.name == "finish_reason" else ""
        else:
            value = 0
        columns[col.name] = [list(value) if isinstance(value, list) else value for _ in range(n)]
    columns["track_id"] = list(range(n))
    columns["pair_id"] = [i // 2 for i in range(n)]
    columns["prompts"] = columns.pop("prompt")
    columns["completion_ids"] = [[] for _ in range(n)]
    return rewards.as_completions([""] * n, is_conversational(prompts)), columns


def _row(columns: dict, i: int) -> str:
    ids = [f"{k} {columns[k][i]!r}" for k in ("prompt_id", "track_id") if k in columns]
    return f"row {i}" + (f" ({', '.join(ids)})" if ids else "")


def _listing(columns: dict) -> str:
    """The columns a reward function receives: the prompt data's first (where a missing one
    would have to be added), then those every call has."""
    made = {c.name for c in schemas.ROLLOUTS.columns} | {"prompts", "completion_ids"}
    data = [c for c in columns if c not in made or c == "prompt_id"]
    always = [
        "completions",
        "prompts",
        "completion_ids",
        *(c for c in columns if c in made and c not in ("prompt_id", "prompts", "completion_ids")),
    ]
    return f"{', '.join(data)} (from the prompt data); also {', '.join(always)}"


def _missing_message(name: str, cols: list[str], columns: dict, where: str) -> str:
    s = "s" * (len(cols) > 1)
    listed = ", ".join(map(repr, cols))
    if name in REWARDS:  # a built-in: the data must change, not the function
        return (
            f"built-in reward function {name!r} needs column{s} {listed} (the reference "
            f"answer), missing from {where}; columns: {_listing(columns)}. Add "
            f"{'them' if s else 'it'} to the prompt file (data.prompts), or use a reward "
            "function of your own (module:function)"
        )
    return (
        f"reward function {name!r} looks up column{s} {listed}, missing from {where}; "
        f"columns: {_listing(columns)}. Add {'them' if s else 'it'} to the prompt "
        "file (data.prompts) or fix the function"
    )


def _signature_problem(fn, columns: dict) -> str | None:
    """Why fn cannot be called as fn(completions=..., **columns), or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(completions=[], **{k: [] for k in columns})
        return None
    except TypeError:
        pass
    params = sig.parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and p.name not in columns
        and p.name != "completions"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if missing:
        return (
            f"needs column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}, "
            f"which the rollouts do not have; columns: {_listing(columns)}. Add "
            f"{'them' if len(missing) > 1 else 'it'} to the prompt file (data.prompts) or "
            "give the parameter a default"
        )
    if not takes_any:
        return (
            f"must accept every column as a keyword argument: declare it as "
            f"`def {getattr(fn, '__name__', 'fn')}(completions, **kwargs)` (columns passed: "
            f"{_listing(columns)})"
        )
    return None


def _missing_column(e: BaseException, columns: dict) -> str | None:
    if (
        isinstance(e, KeyError)
        and len(e.args) == 1
        and isinstance(e.args[0], str)
        and e.args[0] not in columns
        and e.args[0] != "completions"
    ):
        return e.args[0]
    return None


def check_reward(name: str, fn, completions: list[str], columns: dict) -> None:
    """Preflight trial of a reward function on placeholder rows (`placeholder_columns`):
    an error only for what is wrong whatever the completions are — a signature the call
    cannot bind, a column the function looks up that the data lacks (a KeyError that goes
    away when that column is supplied), or a wrong number of values. Any other exception on
    the placeholders is left to the real call on the rollouts."""
    problem = _signature_problem(fn, columns)
    if problem:
        raise RewardError(f"reward function {name!r} {problem}")
    trial, missing, n = dict(columns), [], len(completions)
    for _ in range(8):
        try:
            out = fn(completions=list(completions), **{k: list(v) for k, v in trial.items()})
        except Exception as e:  # noqa: BLE001 - user code; only a missing column counts here
            key = (
                e.args[0]
                if isinstance(e, KeyError)
                and len(e.args) == 1
                and isinstance(e.args[0], str)
                and e.args[0] != "completions"
                else None
            )
            if key is None:
                break
            if key in trial:  # supplying it did not cure it: not a lookup of a column
                if key in missing:
                    missing.remove(key)
                break
            missing.append(key)
            trial[key] = [""] * n
            continue
        if not missing:  # what it returns must be n numbers whatever the completions
            # NaN/None on empty completions may be legitimate: only the count and type count.
            with contextlib.suppress(schemas.SchemaError):
                _values(
                    name,
                    out,
                    n,
                    columns,
                    "a trial call on the first prompts with empty completions",
                    "reward",
                )
        break
    if missing:
        raise RewardError(_missing_message(name, missing, columns, "the prompt data") + ".")


def call_reward(
    name: str, fn, completions: list[str], columns: dict, where: str | Path, column: str
) -> list[float]:
    """Call one reward function on every row; any failure is a RewardError naming the
    function, the exception and the first failing row."""
    n = len(completions)
    problem = _signature_problem(fn, columns)
    if problem:
        raise RewardError(f"reward function {name!r} on {where}: {problem}")
    try:
        raw = fn(completions=completions, **columns)
    except Exception as e:  # noqa: BLE001 - user code: any failure becomes a clear error
        raise _failure(name, fn, e, completions, columns, where) from None
    return _values(name, raw, n, columns, where, column)


def _failure(name, fn, e: Exception, completions, columns, where) -> RewardError:
    col = _missing_column(e, columns)
    if col is not None:  # a lookup of a column only if supplying the column cures it
        try:
            fn(completions=completions, **columns, **{col: [""] * len(completions)})
        except KeyError as again:
            if again.args[:1] == (col,):
                col = None
        except Exception:  # noqa: BLE001 - got past the lookup: it was a column
            pass
    if col is not None:
        return RewardError(
            _missing_message(name, [col], columns, f"the rollouts ({where})") + " (KeyError)."
        )
    what = f"{type(e).__name__}: {e}{_where(e)}"
    # Find the first failing row: call the function on each row alone (bounded in time).
    n, t0 = len(completions), time.monotonic()
    for i in range(n if n > 1 else 0):
        if time.monotonic() - t0 > 10:
            break
        try:
            fn(completions=completions[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
        except Exception as e1:  # noqa: BLE001
            text = completion_text(completions[i])
            text = text if len(text) <= 60 else text[:57] + "..."
            return RewardError(
                f"reward function {name!r} raised {type(e1).__name__}: {e1}"
                f"{_where(e1)} at {_row(columns, i)} of {where}, completion "
                f"{text!r}. Fix the function: it must return a number for "
                "every completion."
            )
    return RewardError(
        f"reward function {name!r} raised {what} on the {n} completions of "
        f"{where}" + (" (no single row fails alone)" if n > 1 else "") + ". Fix the function."
    )


def _values(name, raw, n, columns, where, column) -> list[float]:
    if (
        raw is None
        or isinstance(raw, (str, bytes, dict, int, float))
        or not hasattr(raw, "__iter__")
    ):
        raise RewardError(
            f"reward function {name!r} returned {type(raw).__name__} "
            f"{_short(raw)}, not a list of {n} numbers (one per completion)"
        )
    values = list(raw)
    if len(values) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values for "
            f"{n} completions in {where}; return one per completion"
        )
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))  # named as NaN by check_finite below
            continue
        if isinstance(v, (str, bytes)):
            bad = True
        else:
            try:
                v = float(v)
                bad = False
            except (TypeError, ValueError):
                bad = True
        if bad:
            raise RewardError(
                f"reward function {name!r} returned {type(v).__name__} "
                f"{_short(v)} at {_row(columns, i)} of {where}; return a number "
                "(int or float) per completion"
            )
        out.append(v)
    schemas.check_finite(out, f"{where} (reward function {name!r})", column)
    return out


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _weights(cfg: Config, names: list[str], models: list[str]) -> list[float]:
    weights = list(cfg.score.reward_weights)
    n = len(names) + len(models)
    if not weights:
        return [1.0] * n
    if len(weights) != n:
        listed = ", ".join([*names, *models])
        raise RewardError(
            f"score.reward_weights has {len(weights)} weights for {len(names)} reward "
            f"function{'s' * (len(names) != 1)} and {len(models)} reward "
            f"model{'s' * (len(models) != 1)} ({listed}); give one weight per function, "
            "then one per model (score.reward_funcs, then score.reward_models), or none "
            "(all 1.0)"
        )
    return weights


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    path = inputs["rollouts"] / "rollouts.parquet"
    table = schemas.validate(pq.read_table(path), schemas.ROLLOUTS, path)
    completions, columns = reward_columns(table)
    names = list(cfg.score.reward_funcs)
    models = list(cfg.score.reward_models)
    cols = column_names(names)
    mcols = rewards.model_columns(models, taken=set(cols.values()))
    weights = _weights(cfg, names, models)
    for m in models:  # every folder before the first (slow) call
        rewards.check_model_folder(m)
    total = np.zeros(table.num_rows)
    metrics = {}
    for name, w in zip(names, weights):
        fn = resolve(name)
        values = call_reward(name, fn, completions, columns, path, cols[name])
        arr = np.asarray(values, dtype=np.float64)
        table = table.append_column(cols[name], pa.array(arr))
        total += w * arr
        metrics[cols[name]] = float(arr.mean())
    if models:
        from pipeline.models import resolve_device

        device = resolve_device(cfg.score.device)
        batch = cfg.score.reward_model_batch_size
        for m, w in zip(models, weights[len(names) :]):
            values = rewards.score_with_model(m, columns["prompts"], completions, device, batch)
            schemas.check_finite(values, f"{path} (reward model {m})", mcols[m])
            arr = np.asarray(values, dtype=np.float64)
            table = table.append_column(mcols[m], pa.array(arr))
            total += w * arr
            metrics[mcols[m]] = float(arr.mean())
    table = table.append_column("reward", pa.array(total))
    table = schemas.validate(table, schemas.SCORED, out_dir / "scored.parquet")
    pq.write_table(table, out_dir / "scored.parquet")

    # Summaries over round-0 tracks only: those are independent samples of the policy
    # (inheriting tracks share a prefix with their survivor).
    first = np.asarray(table.column("birth_round").to_pylist()) == 0
    lens = np.array([len(r) for r in table.column("response_ids").to_pylist()])[first]
    total = total[first]
    correct = total >= cfg.score.correct_threshold
    metrics.update(
        {
            "reward_mean": float(total.mean()),
            "reward_std": float(total.std()),
            "accuracy": float(correct.mean()),
            "mean_len_correct": float(lens[correct].mean()) if correct.any() else None,
            "mean_len_incorrect": float(lens[~correct].mean()) if (~correct).any() else None,
            "mean_response_len": float(lens.mean()),
            **within_prompt_gap(
                np.asarray(table.column("prompt_id").to_pylist())[first], lens, correct
            ),
        }
    )
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


STAGE = Stage(
    name="score",
    version=1,
    inputs=("rollouts",),
    output="scored",
    reads=reads,
    ignores=IGNORES,
    packages=packages,
    key_extra=reward_code,
    implementation=lambda cfg: "score.rewards",
    run=run,
    module=__name__,
)
