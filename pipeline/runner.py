"""Runs one stage with caching and records it in the run directory.

This is the one place that knows how stages connect; the Prefect flow and the `eqlen
stage` command both call `run_stage`. A run directory holds:

    RUN_DIR/config.yaml      the resolved config of the last `eqlen run`
    RUN_DIR/run.json         per iteration and stage: key, output folder, cached, inputs
    RUN_DIR/cache/...        stage outputs, `<stage>/<key>/` (unless cache_dir is set)

Stage modules (`stages/*.py`) expose `NAME`, `VERSION`, `INPUTS` (names of their inputs),
`implementation(cfg)`, `key_config(cfg)` (the config that can change their output) and
`run(inputs, out_dir, cfg, ctx) -> {"rows", "metrics"}`. They know nothing of caching,
run records or Prefect.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline import cache
from pipeline.errors import EqLenError
from pipeline.config import Config, to_dict

STAGE_NAMES = ("generate", "score", "pair", "update")
OUTPUT_LABEL = {"generate": "rollouts", "score": "scored", "pair": "units", "update": "policy"}
UPSTREAM = {"score": ("rollouts", "generate"), "pair": ("scored", "score"),
            "update": ("units", "pair")}


class RunError(EqLenError, RuntimeError):
    """A run directory that cannot serve the request; the message says what to do."""


def stage_module(name: str):
    if name not in STAGE_NAMES:
        raise RunError(f"unknown stage {name!r}; valid stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"stages.{name}")


@dataclass
class Ref:
    """A stage input: a folder and the digest that stands for its content."""
    path: str
    digest: str

    @classmethod
    def of(cls, path: str | Path) -> "Ref":
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


@dataclass
class Context:
    """What a stage may know besides its inputs and config."""
    iteration: int
    log: Callable[[str], None] = print


def cache_root(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else run_dir / "cache"


def stage_key(name: str, cfg: Config, inputs: dict[str, Ref], iteration: int) -> tuple[str, dict]:
    mod = stage_module(name)
    parts = {
        "stage": name,
        "implementation": mod.implementation(cfg),
        "version": mod.VERSION,
        "code": cache.source_digest(mod.__file__, *getattr(mod, "CODE_DEPS", ())),
        "config": mod.key_config(cfg, iteration),
        "inputs": {k: v.digest for k, v in sorted(inputs.items())},
    }
    return cache.cache_key(parts), parts


def _select_inputs(mod, inputs: dict[str, Ref]) -> dict[str, Ref]:
    missing = set(mod.INPUTS) - set(inputs)
    if missing:
        raise RunError(f"stage {mod.NAME} needs inputs {sorted(missing)}")
    return {k: inputs[k] for k in mod.INPUTS}


def is_cached(name: str, cfg: Config, run_dir: str | Path, iteration: int,
              inputs: dict[str, Ref]) -> bool:
    """Whether run_stage would serve this stage from cache (used to label task runs)."""
    inputs = _select_inputs(stage_module(name), inputs)
    key, _ = stage_key(name, cfg, inputs, iteration)
    return cache.lookup(cache_root(cfg, Path(run_dir).resolve()) / name / key) is not None


def run_stage(name: str, cfg: Config, run_dir: str | Path, iteration: int,
              inputs: dict[str, Ref], *, force: bool = False,
              log: Callable[[str], None] = print) -> StageResult:
    """Serve stage `name` from cache or run it, then record it in run.json."""
    run_dir = Path(run_dir).resolve()
    mod = stage_module(name)
    inputs = _select_inputs(mod, inputs)
    key, parts = stage_key(name, cfg, inputs, iteration)
    folder = cache_root(cfg, run_dir) / name / key
    manifest = None if force else cache.lookup(folder)
    cached = manifest is not None
    t0 = time.perf_counter()
    if not cached:
        ctx = Context(iteration=iteration, log=log)
        manifest = cache.write(
            folder,
            lambda tmp: mod.run({k: Path(v.path) for k, v in inputs.items()}, tmp, cfg, ctx),
            dict(parts, key=key, iteration=iteration,
                 input_paths={k: v.path for k, v in inputs.items()}),
        )
    result = StageResult(stage=name, iteration=iteration, key=key, path=str(folder),
                         cached=cached, rows=manifest["rows"], metrics=manifest["metrics"],
                         digest=manifest["output_digest"],
                         seconds=round(time.perf_counter() - t0, 3), inputs=inputs)
    RunRecord(run_dir).record(result)
    return result


class RunRecord:
    """run.json: what each iteration's stages resolved to, for `show` and `eqlen stage`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "run.json"

    def load(self) -> dict:
        if not self.path.is_file():
            return {"run_dir": str(self.run_dir), "iterations": []}
        return json.loads(self.path.read_text())

    def save(self, data: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cache.atomic_write_text(self.path, json.dumps(data, indent=2))

    def start(self, cfg: Config, iterations: int) -> None:
        """A new `eqlen run`: record its config; forget iterations it will not reach."""
        data = self.load()
        data["config"] = to_dict(cfg)
        data["iterations"] = data["iterations"][:iterations]
        self.save(data)
        cache.atomic_write_text(self.run_dir / "config.yaml",
                                yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def record(self, r: StageResult) -> None:
        data = self.load()
        its = data["iterations"]
        while len(its) <= r.iteration:
            its.append({"index": len(its), "stages": {}})
        entry = {k: v for k, v in asdict(r).items() if k not in ("stage", "iteration", "metrics")}
        its[r.iteration]["stages"][r.stage] = entry
        self.save(data)

    def config(self) -> dict:
        data = self.load()
        if "config" not in data:
            raise RunError(f"{self.path} has no recorded config: start the run with `eqlen run "
                           f"--run-dir {self.run_dir}` first")
        return data["config"]

    def entry(self, iteration: int, stage: str) -> dict:
        its = self.load()["iterations"]
        if iteration >= len(its) or stage not in its[iteration]["stages"]:
            have = [f"{i['index']}:{','.join(i['stages'])}" for i in its]
            raise RunError(f"{self.path}: iteration {iteration} has no '{stage}' output "
                           f"(recorded: {'; '.join(have) or 'nothing'}); run the stages before "
                           "it first")
        return its[iteration]["stages"][stage]


def resolve_inputs(name: str, cfg: Config, run_dir: str | Path, iteration: int) -> dict[str, Ref]:
    """Inputs of a stage from the run record: what the offline rerun (`eqlen stage`) uses."""
    rec = RunRecord(run_dir)
    if name in UPSTREAM:
        label, up = UPSTREAM[name]
        e = rec.entry(iteration, up)
        inputs = {label: Ref(e["path"], e["digest"])}
    else:
        inputs = {}
    if name in ("generate", "update"):
        # Both consume the policy the iteration started from; generate recorded it.
        inputs["policy"] = Ref(**rec.entry(iteration, "generate")["inputs"]["policy"])
    if name == "update":
        inputs["reference"] = policy_input(cfg)
    if name == "generate":
        inputs["prompts"] = Ref(**rec.entry(iteration, "generate")["inputs"]["prompts"])
    for k, ref in inputs.items():
        if not Path(ref.path).exists():
            raise RunError(f"input '{k}' of stage {name} (iteration {iteration}) at {ref.path} "
                           "is gone; rerun the stage that wrote it")
    return inputs


StageCall = Callable[[str, Config, Path, int, dict, bool], StageResult]


def _direct(name: str, cfg: Config, run_dir: Path, iteration: int, refs: dict,
            force: bool) -> StageResult:
    return run_stage(name, cfg, run_dir, iteration, refs, force=force)


def online(cfg: Config, run_dir: str | Path, *, force: bool = False, call: StageCall = _direct,
           on_iteration: Callable[[int, dict], None] | None = None) -> list[dict[str, StageResult]]:
    """The online loop: per iteration generate -> score -> pair -> update, then the update's
    model becomes the next iteration's policy (weight sync). `call` runs one stage: directly
    here, as a Prefect task in flows/online.py."""
    from pipeline.prompts import materialize

    run_dir = Path(run_dir).resolve()
    RunRecord(run_dir).start(cfg, cfg.iterations)
    prompts = Ref.of(materialize(cfg, cache_root(cfg, run_dir)))
    policy = reference = policy_input(cfg)
    history = []
    for i in range(cfg.iterations):
        refs = {"prompts": prompts, "policy": policy, "reference": reference}
        results = {}
        for name in STAGE_NAMES:
            results[name] = res = call(name, cfg, run_dir, i, refs, force)
            refs[OUTPUT_LABEL[name]] = res.ref()
        policy = results["update"].ref("model")
        history.append(results)
        if on_iteration is not None:
            on_iteration(i, results)
    return history


def policy_input(cfg: Config) -> Ref:
    """The initial policy: the shipped demo model or a local model folder."""
    if cfg.model == "demo":
        from pipeline.demo import demo_model_dir
        return Ref.of(demo_model_dir())
    p = Path(cfg.model).expanduser()
    if not (p / "config.json").is_file():
        raise RunError(f"model: {cfg.model!r} is not a local Hugging Face model folder (no "
                       "config.json); give a folder written by save_pretrained, or `demo`")
    return Ref.of(p)
