"""Runs one stage with caching and records it in the run directory.

(Over 500 lines: the wiring, the run record and the input resolution all read the same
record format; split them when the Ray runner of the scale-out issue lands beside it.)

This is the one place that knows how stages connect, and it learns it from the stages'
declarations (`STAGE` in each stage module, see pipeline/stage.py): a stage's input label
is the output label of the stage that makes it, in the same iteration when that stage comes
earlier in the loop (eval -> generate -> score -> pair -> update), else in the iteration
before (the update's `policy` feeds the next iteration's eval, generate and update); labels
that no stage makes (`prompts`, `heldout`, the initial `policy`, the `reference`) are the
run's own inputs. The Prefect flow and the `eqlen stage` command both call `run_stage`.

The held-out eval (stages/evaluate.py) runs when `eval.every` > 0: at iteration i it
evaluates the policy that iteration starts from (i updates done; 0 = the initial model),
at i = 0, every, 2*every, ..., and once more after the loop, as iteration N = `iterations`,
a record holding only the eval of the final policy. `online` also copies every stage's
metrics to the experiment trackers of `log.to` (flows/tracking.py). A run directory holds:

    RUN_DIR/config.yaml      the resolved config of the last `eqlen run`
    RUN_DIR/run.json         per iteration and stage: key, output folder, cached, inputs
    RUN_DIR/cache/...        stage outputs, `<stage>/<key>/` (unless cache_dir is set)

Paths in run.json are relative to the run directory when they lie inside it, so a run
directory can be copied or moved (an external `cache_dir` stays absolute). run.json is
rewritten atomically under a lock, so concurrent `eqlen stage` commands on one run do not
lose each other's records.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import cache
from pipeline.config import Config, to_dict, validate
from pipeline.errors import EqLenError
from pipeline.stage import ConfigView, Stage, UndeclaredRead

# In loop order. The eval comes first: it evaluates the policy the iteration starts from,
# which is what generate samples from.
STAGE_NAMES = ("eval", "generate", "score", "pair", "update")
# Stage -> module, where they differ (`eval` would shadow the builtin as a module name).
STAGE_MODULES = {"eval": "stages.evaluate"}
# Config keys that no stage reads: they decide the run's own inputs (whose content digests
# are in every key downstream) or where and how long the loop runs.
RUN_FIELDS = {
    "iterations": "the loop's length (in the update's key when its lr schedule decays)",
    "cache_dir": "where outputs are stored, not what they are",
    "model": "the initial policy: its content digest is the `policy` input of iteration 0",
    "data.prompts": "the prompt source: its content digest keys the `prompts` input",
    "data.prompt_column": "how the prompts input is read (in its key)",
    "data.id_column": "how the prompts input is read (in its key)",
    "data.demo_size": "the demo prompts input (in its key)",
    "data.split": "how the prompts input is read (in its key)",
    "data.subset": "how the prompts input is read (in its key)",
    "data.answer_column": "how the prompts input is read (in its key)",
    "data.system_prompt": "part of the prompts input's messages (in its key)",
    "eval.every": "when the loop runs the eval stage, not what it computes",
    "eval.data": "the held-out prompt source: its content digest keys the `heldout` input",
    "eval.split": "how the heldout input is read (in its key)",
    "cluster.ray_address": "where workers run, not what they compute",
    "log.to": "where metrics are copied to, not what they are",
    "log.dir": "where metrics are copied to, not what they are",
    "log.project": "where metrics are copied to, not what they are",
}


class RunError(EqLenError, RuntimeError):
    """A run directory that cannot serve the request; the message says what to do."""


def load_stages() -> None:
    """Import every stage module, so their registries (engines, strategies, algorithms,
    ...) are known to config validation (pipeline/config.py) and to `eqlen config`."""
    for name in STAGE_NAMES:
        importlib.import_module(STAGE_MODULES.get(name, f"stages.{name}"))


def stage_spec(name: str) -> Stage:
    if name not in STAGE_NAMES:
        raise RunError(f"unknown stage {name!r}; valid stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(STAGE_MODULES.get(name, f"stages.{name}")).STAGE


def eval_due(cfg: Config, iteration: int) -> bool:
    """Whether the online loop evaluates at `iteration` (see the module docstring)."""
    every = cfg.eval.every
    return every > 0 and (iteration % every == 0 or iteration == cfg.iterations)


# When the online loop runs a stage, for the stages that do not run every iteration.
SCHEDULE: dict[str, Callable[[Config, int], bool]] = {"eval": eval_due}


def due(name: str, cfg: Config, iteration: int) -> bool:
    return SCHEDULE[name](cfg, iteration) if name in SCHEDULE else True


def producer(label: str, stage: str, iteration: int) -> tuple[str, int] | None:
    """(stage, iteration) whose output is input `label` of `stage` at `iteration`, or None
    for the run's own inputs (prompts, the initial policy, the reference)."""
    for name in STAGE_NAMES:
        if stage_spec(name).output == label:
            same = STAGE_NAMES.index(name) < STAGE_NAMES.index(stage)
            it = iteration if same else iteration - 1
            return (name, it) if it >= 0 else None
    return None


@dataclass
class Ref:
    """A stage input: a folder and the digest that stands for its content."""

    path: str
    digest: str

    @classmethod
    def of(cls, path: str | Path) -> Ref:
        path = Path(path).resolve()
        if not path.exists():
            raise RunError(f"input {path} does not exist")
        return cls(str(path), cache.input_digest(path))


@dataclass
class StageResult:
    stage: str
    iteration: int
    key: str
    path: str
    cached: bool
    rows: int
    metrics: dict[str, Any]
    digest: str
    seconds: float
    inputs: dict[str, Ref] = field(default_factory=dict)

    def ref(self, sub: str = "") -> Ref:
        p = Path(self.path) / sub if sub else Path(self.path)
        return Ref(str(p), self.digest + (f":{sub}" if sub else ""))

    def output(self) -> Ref:
        """The input this result is to later stages (the update's `model/`, ...)."""
        return self.ref(stage_spec(self.stage).output_sub)


class Context:
    """What a stage may know besides its inputs and config. `iteration` is readable only by
    stages that declare `uses_iteration` (it is then in their key)."""

    def __init__(self, iteration: int | None, log: Callable[[str], None] = print, stage: str = ""):
        self._iteration, self.log, self.stage = iteration, log, stage

    @property
    def iteration(self) -> int:
        if self._iteration is None:
            raise UndeclaredRead(
                f"stage {self.stage!r} read ctx.iteration without declaring "
                "uses_iteration=True in its STAGE, so its key leaves it out"
            )
        return self._iteration


def cache_root(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else run_dir / "cache"


def _select_inputs(spec: Stage, inputs: dict[str, Ref]) -> dict[str, Ref]:
    missing = set(spec.inputs) - set(inputs)
    if missing:
        raise RunError(f"stage {spec.name} needs inputs {sorted(missing)}")
    return {k: inputs[k] for k in spec.inputs}


def stage_key(name: str, cfg: Config, inputs: dict[str, Ref], iteration: int) -> tuple[str, dict]:
    spec = stage_spec(name)
    parts = spec.key_parts(cfg, {k: v.digest for k, v in inputs.items()}, iteration)
    return cache.cache_key(parts), parts


def is_cached(
    name: str, cfg: Config, run_dir: str | Path, iteration: int, inputs: dict[str, Ref]
) -> bool:
    """Whether run_stage would serve this stage from cache (used to label task runs)."""
    inputs = _select_inputs(stage_spec(name), inputs)
    key, _ = stage_key(name, cfg, inputs, iteration)
    return cache.lookup(cache_root(cfg, Path(run_dir).resolve()) / name / key) is not None


def _check_inputs(name: str, iteration: int, inputs: dict[str, Ref]) -> None:
    for label, ref in inputs.items():
        if not Path(ref.path).exists():
            raise RunError(
                f"input '{label}' of stage {name} (iteration {iteration}) at "
                f"{ref.path} is gone; rerun the stage that wrote it"
            )
        if not cache.input_intact(Path(ref.path)):
            raise RunError(
                f"input '{label}' of stage {name} (iteration {iteration}) at {ref.path} was "
                "modified after it was written (its files no longer match its manifest), so "
                "nothing computed from it can be trusted. Rerun the stage that wrote it with "
                "--force, or pass an edited copy as a new dataset folder."
            )


def run_stage(
    name: str,
    cfg: Config,
    run_dir: str | Path,
    iteration: int,
    inputs: dict[str, Ref],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    record: bool = True,
) -> StageResult:
    """Serve stage `name` from cache or run it, then record it in run.json (unless not
    `record`: `eqlen eval` on a run's policy leaves the run's record as it is)."""
    run_dir = Path(run_dir).resolve()
    spec = stage_spec(name)
    load_stages()
    validate(cfg)  # registry choices (engine, strategy, ...) are known from here on
    inputs = _select_inputs(spec, inputs)
    _check_inputs(name, iteration, inputs)
    key, parts = stage_key(name, cfg, inputs, iteration)
    folder = cache_root(cfg, run_dir) / name / key
    # The stage sees only the config it declared (pipeline/stage.py): what it can read is
    # exactly what its key covers.
    view = ConfigView(cfg, spec.allowed(cfg), name)
    ctx = Context(iteration if spec.uses_iteration else None, log=log, stage=name)
    t0 = time.perf_counter()
    manifest, cached = cache.get_or_write(
        folder,
        lambda tmp: spec.run({k: Path(v.path) for k, v in inputs.items()}, tmp, view, ctx),
        dict(
            parts, key=key, iteration=iteration, input_paths={k: v.path for k, v in inputs.items()}
        ),
        force=force,
    )
    result = StageResult(
        stage=name,
        iteration=iteration,
        key=key,
        path=str(folder),
        cached=cached,
        rows=manifest["rows"],
        metrics=manifest["metrics"],
        digest=manifest["output_digest"],
        seconds=round(time.perf_counter() - t0, 3),
        inputs=inputs,
    )
    if record:
        RunRecord(run_dir).record(result)
    return result


class RunRecord:
    """run.json: what each iteration's stages resolved to, for `show` and `eqlen stage`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "run.json"

    # -- paths: relative inside the run dir, so a copied or moved run dir still works
    def rel(self, path: str | Path) -> str:
        p = Path(path)
        return p.relative_to(self.run_dir).as_posix() if p.is_relative_to(self.run_dir) else str(p)

    def abs(self, path: str) -> str:
        return str(self.run_dir / path) if not Path(path).is_absolute() else path

    def load(self) -> dict:
        if not self.path.is_file():
            if self.path.exists() or (self.run_dir.exists() and not self.run_dir.is_dir()):
                raise RunError(f"{self.path} is not a file; give a run directory")
            return {"iterations": []}
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(self._damaged(f"it is not valid JSON ({e})")) from None
        if not (
            isinstance(data, dict)
            and isinstance(data.get("iterations"), list)
            and all(
                isinstance(it, dict) and isinstance(it.get("stages"), dict)
                for it in data["iterations"]
            )
        ):
            raise RunError(
                self._damaged("it is not a run record (an object with an 'iterations' list)")
            )
        return data

    def _damaged(self, why: str) -> str:
        return (
            f"{self.path} is damaged: {why}. The stage outputs it pointed to are intact "
            f"in the cache: `eqlen run --run-dir {self.run_dir}` with the run's config "
            f"(saved in {self.run_dir / 'config.yaml'}) re-records them from the cache "
            "without recomputing; it keeps the damaged file as run.json.damaged."
        )

    def repair(self) -> bool:
        """Move a damaged run.json aside (for `eqlen run`, which re-records from cache)."""
        try:
            self.load()
            return False
        except RunError:
            if not self.path.is_file():
                raise
            self.path.replace(self.path.with_name("run.json.damaged"))
            return True

    def snapshot(self) -> dict:
        """The record as it is now, for `restore`."""
        yaml_file = self.run_dir / "config.yaml"
        return {
            "data": self.load() if self.path.is_file() else None,
            "config.yaml": yaml_file.read_text() if yaml_file.is_file() else None,
        }

    def restore(self, snapshot: dict, written: list[tuple[int, str]]) -> None:
        """Undo what this process wrote since `snapshot`: the entries `written` get their
        old value back (or go), the config too; what other commands recorded meanwhile
        (a concurrent `eqlen stage`) stays."""
        old = snapshot["data"] or {"iterations": []}
        with cache.locked(self.path):
            data = self.load()
            its, old_its = data["iterations"], old["iterations"]
            its += old_its[len(its) :]  # iterations the failed run's start had cut
            for i, name in written:
                before = old_its[i]["stages"].get(name) if i < len(old_its) else None
                if before is not None:
                    its[i]["stages"][name] = before
                elif i < len(its):
                    its[i]["stages"].pop(name, None)
            while its and not its[-1]["stages"]:
                its.pop()
            if "config" in old:
                data["config"] = old["config"]
            else:
                data.pop("config", None)
            if snapshot["data"] is None and not its:
                self.path.unlink(missing_ok=True)
            else:
                self.save(data)
            yaml_file = self.run_dir / "config.yaml"
            if snapshot["config.yaml"] is None:
                yaml_file.unlink(missing_ok=True)
            else:
                cache.atomic_write_text(yaml_file, snapshot["config.yaml"])

    def save(self, data: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_text(self.path, json.dumps(data, indent=2))

    def start(self, cfg: Config, iterations: int) -> None:
        """A new `eqlen run`: record its config; forget iterations it will not reach. Called
        once the run's first stage has succeeded, so a command that fails on bad input
        leaves the record of the last good run as it was."""
        recorded = to_dict(cfg)
        # Paths as absolute: `eqlen stage` from another directory must find the same cache
        # and model (a run inside RUN/cache needs no cache_dir and stays relocatable).
        if cfg.cache_dir:
            recorded["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
        if cfg.model not in ("demo", "pad"):  # the shipped models are names, not paths
            recorded["model"] = str(Path(cfg.model).expanduser().resolve())
        with cache.locked(self.path):
            data = self.load()
            data["config"] = recorded
            data["iterations"] = data["iterations"][:iterations]
            self.save(data)
            cache.atomic_write_text(
                self.run_dir / "config.yaml", yaml.safe_dump(recorded, sort_keys=False)
            )

    def record(self, r: StageResult) -> None:
        # The caches learn which runs use them (`eqlen datasets`, `eqlen gc`): the one the
        # output is in, and those of its inputs (units from another run, `--input`).
        register_run(Path(r.path).parent.parent, self.run_dir)
        for ref in r.inputs.values():
            p = Path(ref.path)
            owner = next((c for c in (p, p.parent) if (c / cache.MANIFEST).is_file()), None)
            if owner is not None:
                register_run(owner.parent.parent, self.run_dir)
        entry = {k: v for k, v in asdict(r).items() if k not in ("stage", "iteration", "metrics")}
        entry["path"] = self.rel(r.path)
        entry["inputs"] = {
            k: {"path": self.rel(v.path), "digest": v.digest} for k, v in r.inputs.items()
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with cache.locked(self.path):
            data = self.load()
            its = data["iterations"]
            while len(its) <= r.iteration:
                its.append({"index": len(its), "stages": {}})
            its[r.iteration]["stages"][r.stage] = entry
            self.save(data)

    def config(self) -> dict:
        data = self.load()
        if "config" not in data:
            raise RunError(
                f"{self.path} has no recorded config: start the run with `eqlen run "
                f"--run-dir {self.run_dir}` first"
            )
        return data["config"]

    def entries(self) -> list[dict[str, dict]]:
        """Per iteration, {stage: entry} with absolute paths."""
        out = []
        for it in self.load()["iterations"]:
            stages = {}
            for name, e in it["stages"].items():
                e = dict(e, path=self.abs(e["path"]))
                e["inputs"] = {
                    k: dict(v, path=self.abs(v["path"])) for k, v in e.get("inputs", {}).items()
                }
                stages[name] = e
            out.append(stages)
        return out

    def entry(self, iteration: int, stage: str) -> dict:
        its = self.entries()
        if iteration < 0 or iteration >= len(its) or stage not in its[iteration]:
            have = [f"{i}:{','.join(s)}" for i, s in enumerate(its)]
            raise RunError(
                f"{self.path}: iteration {iteration} has no '{stage}' output "
                f"(recorded: {'; '.join(have) or 'nothing'}); run the stages before "
                "it first"
            )
        return its[iteration][stage]

    def stale(self) -> list[dict[str, bool]]:
        """Per iteration and recorded stage: whether an upstream stage's output recorded now
        is not the one this stage was computed from (an offline rerun changed it), directly
        or through a stage in between."""
        its = self.entries()
        flags: list[dict[str, bool]] = []
        for i, stages in enumerate(its):
            flags.append({})
            for name in STAGE_NAMES:
                if name not in stages:
                    continue
                e, stale = stages[name], False
                for label, ref in e["inputs"].items():
                    src = producer(label, name, i)
                    if src is None or src[0] not in its[src[1]]:
                        continue
                    up = its[src[1]][src[0]]
                    sub = stage_spec(src[0]).output_sub
                    want = up["digest"] + (f":{sub}" if sub else "")
                    stale |= ref["digest"] != want or flags[src[1]].get(src[0], False)
                flags[i][name] = stale
        return flags


RUNS_DIR = ".runs"  # in a cache root: one small file per run directory that recorded into it


def register_run(root: Path, run_dir: Path) -> None:
    """Note in cache root `root` that `run_dir` records outputs from it (idempotent)."""
    import hashlib

    d = Path(root) / RUNS_DIR
    f = d / (hashlib.sha256(str(run_dir).encode()).hexdigest()[:16] + ".json")
    if not f.is_file():
        d.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_text(f, json.dumps({"run_dir": str(run_dir)}))


def registered_runs(root: Path) -> list[Path]:
    """Run directories that recorded outputs from cache root `root` and still exist."""
    out = []
    for f in sorted((Path(root) / RUNS_DIR).glob("*.json")):
        try:
            d = Path(json.loads(f.read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (d / "run.json").is_file():
            out.append(d)
    return out


# Dataset folders by input label: the file a stage reads and its schema (for --input).
DATASET_FILES = {
    "prompts": "prompts.parquet",
    "heldout": "prompts.parquet",
    "rollouts": "rollouts.parquet",
    "scored": "scored.parquet",
    "units": "units.parquet",
}
DATASET_SCHEMAS = {"heldout": "prompts"}  # labels whose schema has another name


def external_input(label: str, path: str | Path) -> Ref:
    """A dataset folder given by the user (`eqlen stage NAME --input LABEL=PATH`): another
    run's output or a folder copied from a colleague, checked against its schema first."""
    import pyarrow.parquet as pq

    import schemas

    path = Path(path).expanduser().resolve()
    if label in DATASET_FILES:
        f = path / DATASET_FILES[label]
        if not f.is_file():
            raise RunError(
                f"--input {label}={path}: no {DATASET_FILES[label]} in that folder; "
                f"give the folder of a '{label}' dataset (a stage output folder)"
            )
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise RunError(
                f"--input {label}={path}: {f} is not a readable Parquet file "
                f"({type(e).__name__}: {e})"
            ) from None
        schemas.validate(table, schemas.ALL[DATASET_SCHEMAS.get(label, label)], f)
    elif label in ("policy", "reference"):
        if not (path / "config.json").is_file():
            raise RunError(
                f"--input {label}={path}: not a Hugging Face model folder (no "
                "config.json); give a folder written by save_pretrained"
            )
    else:
        raise RunError(
            f"--input {label}=...: unknown dataset label; valid: "
            f"{', '.join([*DATASET_FILES, 'policy', 'reference'])}"
        )
    if not path.is_dir():
        raise RunError(f"--input {label}={path}: not a folder")
    return Ref.of(path)


def resolve_inputs(
    name: str,
    cfg: Config,
    run_dir: str | Path,
    iteration: int,
    given: dict[str, str | Path] | None = None,
) -> dict[str, Ref]:
    """Inputs of a stage from the run record: what the offline rerun (`eqlen stage`) uses.
    A label made by another stage comes from that stage's output recorded now; the run's
    own inputs come from what this stage (or another of the iteration) recorded. `given`
    ({label: folder}, `--input`) overrides any of them with a dataset folder from anywhere;
    a label neither given nor recorded in a new run directory comes from the config
    (`model` for the policy and the reference; `data.prompts` for the prompts)."""
    spec = stage_spec(name)
    rec = RunRecord(run_dir)
    if iteration < 0:
        raise RunError(f"--iteration {iteration}: iterations are numbered from 0")
    unknown = set(given or {}) - set(spec.inputs)
    if unknown:
        raise RunError(
            f"stage {name} has no input {sorted(unknown)}; its inputs: {', '.join(spec.inputs)}"
        )
    its = rec.entries() if rec.path.is_file() else []
    inputs = {label: external_input(label, p) for label, p in (given or {}).items()}
    for label in spec.inputs:
        if label in inputs:
            continue
        if not its and label in ("policy", "reference"):
            inputs[label] = policy_input(cfg)
            continue
        if not its and label == "prompts":
            from pipeline.prompts import materialize

            inputs[label] = Ref.of(materialize(cfg, cache_root(cfg, rec.run_dir)))
            continue
        if label == "heldout" and not any(
            label in e.get("inputs", {}) for st in its for e in st.values()
        ):  # no eval recorded yet: from the config's eval.data
            inputs[label] = heldout_input(cfg, cache_root(cfg, rec.run_dir))
            continue
        src = producer(label, name, iteration)
        if src is not None:
            if not its:
                raise RunError(
                    f"{rec.run_dir} has no recorded run (no recorded config, no outputs): "
                    f"stage {name} needs its '{label}' input. Give it a dataset folder with "
                    f"--input {label}=PATH, or start the run with `eqlen run --run-dir "
                    f"{rec.run_dir}`."
                )
            e = rec.entry(src[1], src[0])
            sub = stage_spec(src[0]).output_sub
            inputs[label] = Ref(
                str(Path(e["path"]) / sub) if sub else e["path"],
                e["digest"] + (f":{sub}" if sub else ""),
            )
            continue
        if label == "reference":
            inputs[label] = policy_input(cfg)
            continue
        # A run-level input (the prompts; the policy of iteration 0) as this iteration
        # recorded it, else as any recorded iteration did: extending a run offline
        # (`eqlen stage generate --iteration N` after N iterations) needs no record of N.
        order = [iteration] + [i for i in range(len(its)) if i != iteration]
        recorded = [
            s["inputs"][label]
            for i in order
            if i < len(its)
            for s in its[i].values()
            if label in s.get("inputs", {}) and (label != "policy" or i == 0)
        ]
        if not recorded:
            rec.entry(iteration, "generate")  # raises naming what is recorded
            raise RunError(f"{rec.path}: no recorded '{label}' input at iteration {iteration}")
        inputs[label] = Ref(recorded[0]["path"], recorded[0]["digest"])
    for k, ref in inputs.items():
        if not Path(ref.path).exists():
            raise RunError(
                f"input '{k}' of stage {name} (iteration {iteration}) at {ref.path} "
                "is gone; rerun the stage that wrote it"
            )
    return inputs


StageCall = Callable[[str, Config, Path, int, dict, bool], StageResult]


def _direct(
    name: str, cfg: Config, run_dir: Path, iteration: int, refs: dict, force: bool
) -> StageResult:
    return run_stage(name, cfg, run_dir, iteration, refs, force=force)


def online(
    cfg: Config,
    run_dir: str | Path,
    *,
    force: bool = False,
    call: StageCall = _direct,
    on_iteration: Callable[[int, dict], None] | None = None,
) -> list[dict[str, StageResult]]:
    """The online loop: per iteration (eval ->) generate -> score -> pair -> update, then
    the update's model becomes the next iteration's policy (weight sync); with eval on, a
    last record N = `iterations` holds the final policy's eval. `call` runs one stage:
    directly here, as a Prefect task in flows/online.py. Every stage's metrics go to the
    trackers of `log.to` as it ends. Returns one {stage: result} per recorded iteration."""
    from flows import tracking
    from pipeline.prompts import materialize

    run_dir = Path(run_dir).resolve()
    rec = RunRecord(run_dir)
    rec.repair()
    if cfg.eval.every > 0:
        from stages.evaluate import check_config

        check_config(cfg)
    # Temporary folders of writers killed earlier (a forced stage, an OOM-killed run): gone
    # now, unless a live writer still owns them.
    cache.sweep(cache_root(cfg, run_dir))
    prompts = Ref.of(materialize(cfg, cache_root(cfg, run_dir)))
    heldout = heldout_input(cfg, cache_root(cfg, run_dir)) if cfg.eval.every > 0 else None
    policy = reference = policy_input(cfg)
    history, started = [], False
    # Until the first iteration has finished, a failure (a reward that raises, an
    # out-of-memory update) puts the record of the last good run back as it was.
    snapshot, written = rec.snapshot(), []
    trackers = tracking.open_trackers(run_dir, cfg)  # a missing package fails here, first
    ok = False
    try:
        last = cfg.iterations + (cfg.eval.every > 0)
        for i in range(last):
            refs = {"prompts": prompts, "policy": policy, "reference": reference}
            if heldout is not None:
                refs["heldout"] = heldout
            # The final record (with eval on) holds the final policy's eval only.
            names = STAGE_NAMES if i < cfg.iterations else ("eval",)
            results = {}
            for name in names:
                if not due(name, cfg, i):
                    continue
                written.append((i, name))  # recorded by the call, or not at all
                results[name] = res = call(name, cfg, run_dir, i, refs, force)
                if not started:
                    rec.start(cfg, cfg.iterations)
                    started = True
                refs[stage_spec(name).output] = res.output()
                trackers.log_stage(res)
            policy = refs["policy"]
            history.append(results)
            snapshot = None
            if on_iteration is not None:
                on_iteration(i, results)
        ok = True
    except BaseException:
        if snapshot is not None:
            rec.restore(snapshot, written)
        raise
    finally:
        trackers.close(ok)
        if cfg.cluster.ray_address:
            end_workers()
    return history


def end_workers() -> None:
    """Stop the run's Ray workers and leave the cluster (a local instance stops)."""
    from pipeline import cluster
    from stages import workers

    workers.close_pools()
    cluster.shutdown()


def heldout_input(cfg: Config, root: Path) -> Ref:
    """The held-out prompts of `eval.data`, materialised like the training prompts (the
    same columns, chat form and dataset settings of `data.*`, eval.split for the split)
    under `root/prompts/`."""
    from pipeline.prompts import materialize

    if not cfg.eval.data:
        raise RunError(
            "the eval stage needs held-out prompts: set eval.data (a prompt file, same forms "
            "as data.prompts), e.g. --set eval.data=heldout.jsonl"
        )
    return Ref.of(materialize(heldout_config(cfg), root))


def heldout_config(cfg: Config) -> Config:
    """`cfg` with data.prompts (and data.split) those of the held-out prompts, eval.*."""
    import dataclasses

    data = dataclasses.replace(
        cfg.data, prompts=cfg.eval.data, split=cfg.eval.split or cfg.data.split
    )
    return dataclasses.replace(cfg, data=data)


def latest_policy(run_dir: str | Path) -> tuple[Ref, int]:
    """The newest policy of a recorded run and the number of updates behind it: the model
    of the last recorded update, else the run's initial policy."""
    rec = RunRecord(run_dir)
    its = rec.entries()
    for i in range(len(its) - 1, -1, -1):
        if "update" in its[i]:
            e = its[i]["update"]
            sub = stage_spec("update").output_sub
            return Ref(str(Path(e["path"]) / sub), f"{e['digest']}:{sub}"), i + 1
    for e in (its[0] if its else {}).values():
        if "policy" in e.get("inputs", {}):
            ref = e["inputs"]["policy"]
            return Ref(ref["path"], ref["digest"]), 0
    raise RunError(f"{rec.path}: no policy recorded; run an iteration first")


def policy_input(cfg: Config) -> Ref:
    """The initial policy: a shipped model (`demo`, `pad`) or a local model folder."""
    if cfg.model == "demo":
        from pipeline.demo import demo_model_dir

        return Ref.of(demo_model_dir())
    if cfg.model == "pad":
        from pipeline.pad_task import pad_model_dir

        return Ref.of(pad_model_dir())
    from pipeline.models import check_folder, resolve_model

    p = resolve_model(cfg.model, cfg.model_trust_remote_code)  # a hub id: its snapshot
    check_folder(p)  # config.json, weights, tokenizer: an error naming what is missing
    return Ref.of(p)
