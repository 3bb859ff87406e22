"""Run configuration: one documented dataclass per stage, loaded from YAML and `--set`.

(Over 500 lines: mostly the documented fields of eight sections; the loading code is
the last 150 lines.)

Every field carries its meaning, unit and default in `metadata["help"]`; fields with a
closed set of values carry `metadata["choices"]`: a tuple, or `registry=True` when the
valid names are those of the registry that the key selects from (`pipeline.registry.BY_KEY`,
filled when the stage modules are imported). This module imports neither the stages nor
torch: the command line imports the stages (`flows.runner.load_stages`) before it loads a
config, so registry choices are checked then, and `runner.run_stage` checks them again.
`eqlen config` prints the table built from this metadata, and docs/config.md is generated
from it.

Overrides use dotted keys (`generate.rounds=4`); values are parsed as YAML scalars or
flow sequences (`score.reward_funcs=[exact_match,mymod:fn]`). An unknown key or a value
of the wrong type fails with a message that lists the valid keys or values.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import EqLenError


class ConfigError(EqLenError, ValueError):
    """A config file or `--set` override that cannot be used; the message says why."""


def _f(
    default: Any,
    help: str,
    choices: tuple | None = None,
    *,
    registry: bool = False,
    extra: tuple = (),
    **kw: Any,
) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if registry:
        meta["registry"], meta["extra"] = True, extra
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    prompts: str = _f(
        "demo",
        "Prompt dataset: `demo` (built-in reverse-the-digits task), `pad` (built-in "
        "task whose wrong answers can grow: docs/tasks.md), or a path to a "
        ".parquet/.jsonl/.json file or folder of Parquet files.",
    )
    prompt_column: str = _f("prompt", "Column holding the prompt text.")
    id_column: str = _f(
        "prompt_id",
        "Column holding a unique prompt id; generated from the row "
        "number when the dataset has no such column.",
    )
    prompts_per_iteration: int = _f(
        128, "Prompts drawn per iteration (cycling through the shuffled dataset)."
    )
    max_prompt_tokens: int = _f(
        64, "Longest prompt accepted, in tokens; longer prompts are an error naming the row."
    )
    demo_size: int = _f(4096, "Number of prompts of the built-in tasks (`demo`, `pad`).")
    system_prompt: str = _f(
        "", "System message put before every conversational prompt (empty = none)."
    )
    split: str = _f("train", "Split of a `datasets` dataset id or folder given as data.prompts.")
    subset: str = _f(
        "", "Configuration (subset) name of a `datasets` dataset id or folder (empty = default)."
    )
    answer_column: str = _f(
        "answer",
        "Column holding the reference answer, passed to reward functions as `answer`.",
    )


@dataclass
class GenerateConfig:
    engine: str = _f("hf", "Rollout engine.", registry=True)
    group_size: int = _f(8, "Tracks per prompt (G), even: G/2 pairs.")
    rounds: int = _f(
        1,
        "Rounds per pair (K): how often an ended track's slot may be refilled "
        "by a track inheriting the survivor's prefix. 1 = independent pairs.",
    )
    max_new_tokens: int = _f(16, "Token budget of a whole response (T), EOS included.")
    temperature: float = _f(
        1.0,
        "Sampling temperature; recorded log-probs are of the "
        "temperature-scaled distribution, as the update recomputes them.",
    )
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0 = off).")
    top_k: int = _f(0, "Top-k sampling (0 = off).")
    batch_tracks: int = _f(512, "Most tracks decoded in one lock-step batch.")
    workers: int = _f(
        1,
        "Rollout workers (Ray actors, each holding one engine for the whole run; needs "
        "cluster.ray_address); prompts are sharded across them.",
    )
    device: str = _f(
        "auto", "Device for the hf engine (and the vllm engine's sync check): auto, cpu, cuda."
    )
    # vLLM engine (generate.engine=vllm). Without a GPU the CPU settings are applied
    # automatically: float32, eager mode, block size 32, in-process engine.
    vllm_dtype: str = _f(
        "auto",
        "vLLM weight dtype: auto (float32 on CPU, the model's dtype "
        "on GPU), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3,
        "Fraction of GPU memory vLLM may take (weights "
        "+ KV cache); the rest is left to the colocated "
        "trainer.",
    )
    vllm_max_model_len: int = _f(
        0,
        "Longest prompt + response vLLM serves; 0 = "
        "data.max_prompt_tokens + generate.max_new_tokens.",
    )
    vllm_tensor_parallel_size: int = _f(1, "GPUs one vLLM engine is split over.")
    vllm_enable_prefix_caching: bool = _f(
        True,
        "Reuse the KV blocks of shared prefixes (the "
        "prompt across a group, the inherited prefix of a "
        "newcomer).",
    )
    vllm_block_size: int = _f(
        0,
        "KV-cache block size in tokens; 0 = vLLM's default on GPU, "
        "32 on CPU (the CPU backend needs a multiple of 32).",
    )
    vllm_enforce_eager: bool = _f(
        False,
        "Disable CUDA graphs / torch.compile (always on for "
        "CPU); faster start-up, slower decoding.",
    )
    vllm_cpu_kvcache_gib: int = _f(
        1,
        "CPU only: GiB of memory for the KV cache "
        "(VLLM_CPU_KVCACHE_SPACE, unless set in the environment).",
    )
    vllm_sync_check: bool = _f(
        True,
        "Every iteration, compare vLLM's log-probs of a fixed "
        "sequence (the dataset's first prompt) with a transformers "
        "forward pass of the same weights; reported in the generate "
        "metrics.",
    )


@dataclass
class ScoreConfig:
    reward_funcs: list[str] = _f(
        ["exact_match"],
        "Reward functions: built-in names or "
        "`module:function` with the TRL contract "
        "`(completions, **columns) -> list[float]`.",
    )
    reward_weights: list[float] = _f(
        [], "Weight per reward function (empty = all 1.0); `reward` is the weighted sum."
    )
    correct_threshold: float = _f(
        1.0, "A response counts as correct in length diagnostics when its reward is at least this."
    )
    reward_models: list[str] = _f(
        [],
        "Local sequence-classification reward models (folders), each scored as one reward "
        "column after the reward functions.",
    )
    reward_model_batch_size: int = _f(32, "Responses per reward-model forward pass.")
    device: str = _f("auto", "Device for the reward models: auto, cpu or cuda.")


@dataclass
class PairConfig:
    strategy: str = _f("group", "How comparison units are built.", registry=True)
    scale_rewards: str = _f(
        "group",
        "Default advantage scaling: `group` divides by the std of "
        "the prompt's rewards, `none` leaves raw differences.",
        choices=("group", "none"),
    )
    eps: float = _f(1e-4, "Added to the std before dividing.")


@dataclass
class UpdateConfig:
    algorithm: str = _f(
        "grpo",
        "Policy-gradient objective: grpo (token ratio), gspo (sequence "
        "ratio over the member's segment), rloo (token ratio, leave-one-out "
        "advantage).",
        registry=True,
    )
    loss_agg: str = _f(
        "seq_mean_token_mean",
        "How token losses are aggregated (per-token "
        "weights, see docs/objectives.md); `unit_mean` is the natural choice "
        "for pair units.",
        registry=True,
    )
    advantage: str = _f(
        "auto",
        "Advantage estimator: auto (the algorithm's: grpo for "
        "grpo/gspo, rloo for rloo), units (the pair stage's `advantage` "
        "column), or an estimator name.",
        registry=True,
        extra=("auto", "units"),
    )
    scale_rewards: str = _f(
        "auto",
        "Advantage scaling (TRL's scale_rewards): group, batch, "
        "none; auto = group for grpo, none for rloo.",
        choices=("auto", "group", "batch", "none"),
    )
    eps: float = _f(1e-4, "Added to the std before dividing.")
    delta_l_alpha: float = _f(1.0, "Exponent alpha of the delta_l aggregation.")
    lr: float = _f(
        5e-4,
        "AdamW peak learning rate (the default suits the demo's 165k-parameter "
        "model; LLMs want ~1e-6).",
    )
    lr_schedule: str = _f(
        "constant",
        "Learning-rate schedule over the whole run (iterations x "
        "epochs x minibatches optimizer steps), after warmup.",
        choices=("constant", "linear", "cosine"),
    )
    warmup_steps: int = _f(0, "Optimizer steps of linear warmup from 0 to lr.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    epochs: int = _f(1, "Passes over the units per update stage.")
    minibatches: int = _f(4, "Optimizer steps per epoch (the members are split evenly).")
    micro_batch_size: int = _f(64, "Sequences per forward/backward (gradient accumulation).")
    clip_low: float = _f(0.2, "Lower clip range: ratio >= 1 - clip_low.")
    clip_high: float = _f(
        0.2, "Upper clip range: ratio <= 1 + clip_high (clip-higher when > clip_low)."
    )
    dual_clip: float = _f(
        0.0, "Dual-clip constant c > 1 bounding negative-advantage losses at -A*c (0 = off)."
    )
    beta: float = _f(
        0.0,
        "KL coefficient to the frozen initial policy (k3 estimator); the "
        "reference is loaded only when beta > 0.",
    )
    mask_truncated: bool = _f(
        False,
        "Leave out of the loss the members whose response hit "
        "max_new_tokens (finish_reason = length).",
    )
    skip_zero_signal: bool = _f(
        True,
        "Do not forward members of units whose rewards are all "
        "equal (advantage 0). Normalisers still count them, so "
        "nobody else's weight shifts; ignored when beta > 0.",
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping by global norm (0 = off).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (saves memory).")
    bf16: bool = _f(True, "bf16 autocast for forward/backward on CUDA (CPU runs fp32).")
    device: str = _f("auto", "auto, cpu or cuda.")
    sapo_temperature_pos: float = _f(
        1.0, "SAPO: temperature of the soft gate for positive advantages."
    )
    sapo_temperature_neg: float = _f(
        1.05, "SAPO: temperature of the soft gate for negative advantages."
    )
    workers: int = _f(
        1,
        "Data-parallel ranks of the update (Ray actors with torch.distributed: gloo on CPU, "
        "NCCL on GPU; needs cluster.ray_address). N ranks take the same step as one.",
    )
    sharding: str = _f(
        "ddp",
        "How ranks hold the model: ddp (replicas, gradients all-reduced) or fsdp (FSDP2: "
        "parameters, gradients and optimizer state sharded).",
        choices=("ddp", "fsdp"),
    )
    lora_r: int = _f(0, "LoRA rank (0 = full fine-tuning); only adapter weights train.")
    lora_alpha: int = _f(16, "LoRA scaling numerator: the update is (alpha / r) * B @ A.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = _f(
        ["all-linear"],
        "Modules that get adapters: names (e.g. [q_proj,v_proj]) or `all-linear`.",
    )


@dataclass
class EvalConfig:
    every: int = _f(0, "Evaluate the policy on eval.data every N iterations (0 = never).")
    data: str = _f("", "Held-out prompts: same forms as data.prompts (empty = none).")
    split: str = _f(
        "", "Split of eval.data when it is a `datasets` id or folder (empty = data.split)."
    )
    k: int = _f(8, "Responses sampled per held-out prompt (avg@k, pass@k).")
    temperature: float = _f(1.0, "Sampling temperature of the evaluation.")
    max_new_tokens: int = _f(0, "Token budget per response; 0 = generate.max_new_tokens.")
    max_prompts: int = _f(0, "Most held-out prompts evaluated (0 = all).")


@dataclass
class LogConfig:
    to: list[str] = _f(
        [],
        "Experiment trackers that get every stage's metrics: any of tensorboard, mlflow, wandb.",
    )
    dir: str = _f("", "Where tracker files go; empty = RUN_DIR/logs.")
    project: str = _f("eqlen", "Experiment / project name in the trackers.")


@dataclass
class ClusterConfig:
    ray_address: str = _f(
        "",
        "Where workers run: empty = no Ray, everything in this process; `local` = a Ray "
        "instance started for the run on 127.0.0.1 (stopped at its end); `auto` or "
        "`ray://HOST:10001` = join an existing cluster.",
    )


@dataclass
class Config:
    seed: int = _f(0, "Seed of prompt order, sampling and training.")
    iterations: int = _f(10, "Online iterations of generate -> score -> pair -> update.")
    model: str = _f(
        "demo",
        "Initial policy: `demo` (the shipped tiny model), `pad` (the `pad` task's), a "
        "local Hugging Face model folder, "
        "or a hub id found in the local Hugging Face cache.",
    )
    model_trust_remote_code: bool = _f(
        False,
        "Let transformers run Python code shipped with the model (trust_remote_code); "
        "only for models whose code you have read.",
    )
    cache_dir: str = _f(
        "",
        "Where stage outputs live, one folder per cache key; empty = "
        "RUN_DIR/cache. Point several runs at one folder to share stages.",
    )
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS = ("data", "generate", "score", "pair", "update", "eval", "log", "cluster")


def choices_of(f: dataclasses.Field, key: str | None = None) -> tuple | None:
    """The valid values of a field: its fixed choices, or its registry's names when the
    registry is loaded (None: not known here)."""
    if f.metadata.get("registry"):
        from pipeline.registry import BY_KEY

        reg = BY_KEY.get(key or "")
        return (*f.metadata["extra"], *reg.names()) if reg is not None else None
    return f.metadata.get("choices")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # The annotations are strings (postponed evaluation): resolving them compiles each one,
    # and a config is loaded once per stage task, so once per class is enough.
    return typing.get_type_hints(cls)


def _set(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    head, _, rest = key.partition(".")
    fields = _fields(obj)
    full = f"{prefix}{head}"
    if head not in fields:
        where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key '{full}'; valid keys {where}: " + ", ".join(sorted(fields))
        )
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _set(current, rest, value, prefix=f"{full}.")
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{full}' is a section; set one of its keys: "
                + ", ".join(sorted(_fields(current)))
            )
        for k, v in value.items():
            _set(current, str(k), v, prefix=f"{full}.")
        return
    if rest:
        raise ConfigError(f"'{full}' is not a section; it has no key '{rest}'")
    setattr(obj, head, _coerce(value, _hints(type(obj))[head], full))


def leaves(obj: Any, prefix: str = ""):
    """(dotted key, field, value, owning dataclass) of every non-section field."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from leaves(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, v, obj


def validate(cfg: Config) -> Config:
    """Check every closed-choice field and the numeric ranges the stages rely on."""
    for key, f, v, _ in leaves(cfg):
        ch = choices_of(f, key)
        if ch is not None and v not in ch:
            raise ConfigError(f"{key}: invalid value {v!r}; valid values: " + ", ".join(ch))
    g = cfg.generate
    checks = [
        (g.group_size >= 2 and g.group_size % 2 == 0, "generate.group_size must be even and >= 2"),
        (g.rounds >= 1, "generate.rounds must be >= 1"),
        (g.max_new_tokens >= 1, "generate.max_new_tokens must be >= 1"),
        (
            g.temperature > 0,
            "generate.temperature must be > 0 (greedy decoding gives no group-relative signal)",
        ),
        (0 < g.top_p <= 1, "generate.top_p must be in (0, 1]"),
        (g.batch_tracks >= g.group_size, "generate.batch_tracks must be >= generate.group_size"),
        (
            0 < g.vllm_gpu_memory_utilization <= 1,
            "generate.vllm_gpu_memory_utilization must be in (0, 1]",
        ),
        (g.vllm_max_model_len >= 0, "generate.vllm_max_model_len must be >= 0 (0 = automatic)"),
        (g.vllm_tensor_parallel_size >= 1, "generate.vllm_tensor_parallel_size must be >= 1"),
        (g.vllm_block_size >= 0, "generate.vllm_block_size must be >= 0 (0 = automatic)"),
        (g.vllm_cpu_kvcache_gib >= 1, "generate.vllm_cpu_kvcache_gib must be >= 1"),
        (cfg.iterations >= 1, "iterations must be >= 1"),
        (cfg.data.prompts_per_iteration >= 1, "data.prompts_per_iteration must be >= 1"),
        (
            cfg.update.epochs >= 1
            and cfg.update.minibatches >= 1
            and cfg.update.micro_batch_size >= 1,
            "update.epochs, update.minibatches and update.micro_batch_size must be >= 1",
        ),
        (cfg.update.lr > 0, "update.lr must be > 0"),
        (
            cfg.update.clip_low >= 0 and cfg.update.clip_high >= 0,
            "update.clip_low and update.clip_high must be >= 0",
        ),
        (
            cfg.update.dual_clip == 0 or cfg.update.dual_clip > 1,
            "update.dual_clip must be 0 (off) or > 1",
        ),
        (cfg.update.beta >= 0, "update.beta must be >= 0"),
        (cfg.pair.eps >= 0 and cfg.update.eps >= 0, "pair.eps and update.eps must be >= 0"),
        (
            not cfg.score.reward_weights
            or len(cfg.score.reward_weights)
            == len(cfg.score.reward_funcs) + len(cfg.score.reward_models),
            "score.reward_weights must be empty or have one weight per entry of "
            "score.reward_funcs, then one per entry of score.reward_models",
        ),
        (cfg.generate.workers >= 1 and cfg.update.workers >= 1, "workers must be >= 1"),
        (
            (cfg.generate.workers == 1 and cfg.update.workers == 1) or cfg.cluster.ray_address,
            "generate.workers > 1 or update.workers > 1 runs workers on Ray: set "
            "cluster.ray_address (local, auto or an address)",
        ),
        (
            not (
                cfg.update.sharding == "fsdp" and cfg.update.lora_r > 0 and cfg.cluster.ray_address
            ),
            "update.sharding=fsdp with update.lora_r > 0 is not supported (FSDP2 would shard "
            "the PEFT-wrapped model, whose merge and save need the whole weights): use "
            "update.sharding=ddp with LoRA (the replicas hold a frozen base and a small "
            "adapter), or lora_r=0 with fsdp",
        ),
        (len(cfg.score.reward_funcs) >= 1, "score.reward_funcs must name at least one function"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply(cfg: Config, data: dict[str, Any] | None = None, overrides: list[str] = ()) -> Config:
    for k, v in (data or {}).items():
        _set(cfg, str(k), v)
    for text in overrides:
        _set(cfg, *parse_override(text))
    return validate(cfg)


def load(
    path: str | Path | None = None, overrides: list[str] = (), base: dict[str, Any] | None = None
) -> Config:
    """Build a Config: defaults, then `base` (a recorded config), then the YAML file, then --set."""
    cfg = Config()
    for k, v in (base or {}).items():
        _set(cfg, k, v)
    data = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping of keys, got {type(data).__name__}"
            )
    try:
        return apply(cfg, data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path and data is not None else str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every config key, for `eqlen config` and docs/config.md."""
    rows = []
    for key, f, v, owner in leaves(Config()):
        ch = choices_of(f, key)
        help_ = f.metadata.get("help", "") + (f" One of: {', '.join(ch)}." if ch else "")
        tp = _hints(type(owner))[f.name]
        rows.append((key, getattr(tp, "__name__", str(tp)), repr(v), help_))
    return rows
