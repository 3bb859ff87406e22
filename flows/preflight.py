"""Checks of a run's inputs that need no model, before any stage (or Prefect) starts.

`eqlen run` calls `check(cfg, run_dir)` right after reading its config, so a typo in a
path, a broken prompt file or a reward function that cannot work is reported in about a
second, as one `EqLenError` (exit code 2, a few lines), before Prefect's start-up and the
first stage's model loading, and before anything is written to the run directory:

- the run directory and the cache folder (`cache_dir`, or RUN_DIR/cache) are folders this
  user can write to (a path that is a file, a read-only folder);
- the model folder holds config.json, weights and tokenizer files
  (`pipeline.models.check_folder`), and its context length (`max_position_embeddings`,
  GPT-2's `n_positions`, ...) holds the longest prompt plus `generate.max_new_tokens`;
- the prompt source can be read and parsed (`pipeline.prompts.load_table`: the file and the
  1-based line of a malformed, empty or non-UTF-8 JSONL) and has the prompt column;
- every reward function imports, is listed once, and passes a trial call on the first two
  prompts with empty completions (`stages.score.check_reward`): only what fails whatever
  the completions are is an error there — a column it looks up that the data lacks (e.g.
  the built-ins' `answer`), a signature the call cannot bind, a wrong number of values.

`eqlen stage NAME` calls `check(cfg, run_dir, stage=NAME, inputs=...)`: the folders, and for
generate the recorded policy folder, for score the reward functions' names and imports.

`out_of_memory(stage, exc, cfg)` turns a stage's out-of-memory exception into an
`EqLenError` naming the stage and the settings to lower (used by the flow and `eqlen stage`).
Nothing here imports torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import EqLenError


class PreflightError(EqLenError, ValueError):
    """A run that cannot start: the message names the path or setting and what to do."""


class OutOfMemory(EqLenError, RuntimeError):
    """A stage ran out of memory; the message names the settings to lower."""


# Tokens a tokenizer may add to a prompt beyond one per UTF-8 byte (BOS/EOS, SentencePiece's
# word-start marker): byte-level BPE, SentencePiece with byte fallback, WordPiece and
# character vocabularies all give at most one token per byte of text.
SPECIAL_TOKEN_SLACK = 8


def check(
    cfg: Config, run_dir: str | Path, *, stage: str | None = None, inputs: dict | None = None
) -> None:
    """Raise an EqLenError for the first problem found; return None when all is well."""
    run_dir = Path(run_dir).expanduser().resolve()
    writable_dir(run_dir, "--run-dir (the run directory)")
    if cfg.cache_dir:
        writable_dir(Path(cfg.cache_dir).expanduser().resolve(), "cache_dir")
    elif (run_dir / "cache").exists():
        writable_dir(run_dir / "cache", "the run's cache folder")
    if stage is None:
        _check_run(cfg)
    elif stage == "generate" and inputs and "policy" in inputs:
        import pyarrow.parquet as pq

        from pipeline import models

        policy = Path(inputs["policy"].path)
        config = models.check_folder(policy, what="the recorded policy")
        prompts_file = Path(inputs["prompts"].path) / "prompts.parquet"
        check_lengths(cfg, config, policy, pq.read_table(prompts_file, columns=["prompt"]))
    elif stage == "score":
        from stages import rewards, score

        score.column_names(list(cfg.score.reward_funcs))
        for name in cfg.score.reward_funcs:
            score.resolve(name)
        for folder in cfg.score.reward_models:
            rewards.check_model_folder(folder)


def _check_run(cfg: Config) -> None:
    from pipeline import models, prompts
    from stages import rewards, score

    # The demo or a folder: no transformers import (2-3 s) for a path.
    model = models.resolve_model(cfg.model, cfg.model_trust_remote_code)
    config = models.check_folder(model)
    check_lengths(cfg, config, model)
    names = list(cfg.score.reward_funcs)
    score.column_names(names)
    fns = {name: score.resolve(name) for name in names}
    for folder in cfg.score.reward_models:  # files only: milliseconds
        rewards.check_model_folder(folder)
    # Now the data: parse it (the demo's is built), then what needs its rows.
    table = prompts.load_table(cfg)
    check_lengths(cfg, config, model, table)
    completions, columns = score.placeholder_columns(table)
    for name in names:
        score.check_reward(name, fns[name], completions, columns)


def writable_dir(path: Path, what: str) -> None:
    """`path` is a folder this user can write to, or can be created as one."""
    if path.exists() and not path.is_dir():
        raise PreflightError(
            f"{what}: {path} is a file, not a folder. Give a folder path "
            "(it is created if missing)."
        )
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(
            f"{what}: {path} cannot be created: {probe} is a file. Give another path."
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=".eqlen-write-check-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        made = "" if probe == path else f" (to create {path})"
        raise PreflightError(
            f"{what}: cannot write in {probe}{made}: "
            f"{e.strerror or e}. Make it writable, or give another "
            "folder."
        ) from None


def check_lengths(cfg: Config, model_config: dict, model: Path, prompts=None) -> None:
    """The longest prompt plus generate.max_new_tokens fits the model's positions (without
    `prompts`: generate.max_new_tokens alone)."""
    from pipeline import models

    found = models.max_positions(model_config)
    if found is None:
        return
    key, limit = found
    g = cfg.generate
    where = f"the model's {key}={limit} ({Path(model) / 'config.json'})"
    if g.max_new_tokens >= limit:
        raise PreflightError(
            f"generate.max_new_tokens={g.max_new_tokens} does not fit "
            f"{where}, which must hold the prompt and the response. Lower "
            f"generate.max_new_tokens below {limit}."
        )
    if g.engine == "vllm" and g.vllm_max_model_len > limit:
        raise PreflightError(
            f"generate.vllm_max_model_len={g.vllm_max_model_len} exceeds "
            f"{where}. Lower it, or set 0 (automatic)."
        )
    if prompts is None:
        return
    import pyarrow.compute as pc

    import schemas

    column = prompts.column("prompt")
    if schemas.is_chat(column.type):  # the chat template's length is known once rendered
        longest_bytes = prompt = cfg.data.max_prompt_tokens
    else:
        longest_bytes = pc.max(pc.binary_length(column)).as_py() or 0
        prompt = min(cfg.data.max_prompt_tokens, longest_bytes + SPECIAL_TOKEN_SLACK)
    if prompt + g.max_new_tokens > limit:
        why = (
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}"
            if prompt == cfg.data.max_prompt_tokens
            else f"at most one per byte of the longest prompt, {longest_bytes} bytes, "
            f"plus {SPECIAL_TOKEN_SLACK} special"
        )
        raise PreflightError(
            f"prompts of up to {prompt} tokens ({why}) plus generate.max_new_tokens="
            f"{g.max_new_tokens} need {prompt + g.max_new_tokens} positions, more than "
            f"{where}. Lower generate.max_new_tokens to {limit - prompt} or less, or "
            "data.max_prompt_tokens."
        )


# Settings that bound each stage's memory, named in the out-of-memory error.
MEMORY_KNOBS = {
    "generate": ("generate.batch_tracks", "generate.max_new_tokens"),
    "score": ("data.prompts_per_iteration", "generate.group_size"),
    "pair": ("data.prompts_per_iteration", "generate.group_size"),
    "update": ("update.micro_batch_size", "generate.max_new_tokens"),
}


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, XPU), MemoryError, or a backend's 'out of memory'."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory(stage: str, exc: BaseException, cfg: Config | None = None) -> OutOfMemory:
    """The error to show for a stage that ran out of memory: the settings to lower."""
    knobs = MEMORY_KNOBS.get(stage, ("data.prompts_per_iteration", "generate.group_size"))
    extra = ""
    if stage == "generate" and cfg is not None and cfg.generate.engine == "vllm":
        knobs = ("generate.vllm_gpu_memory_utilization", "generate.vllm_max_model_len")
    if stage == "update":
        extra = "; update.gradient_checkpointing=true also saves memory"

    def now(k: str) -> str:
        section, _, field = k.partition(".")
        value = getattr(getattr(cfg, section, None), field, None) if cfg is not None else None
        return k if value is None else f"{k} (now {value})"

    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return OutOfMemory(
        f"stage {stage} ran out of memory ({type(exc).__name__}"
        f"{': ' + first if first else ''}). Lower {' or '.join(now(k) for k in knobs)}{extra}, "
        "and run again: the stages that finished are served from the cache."
    )
