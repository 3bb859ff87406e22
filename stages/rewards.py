"""The built-in rewards of the score stage, and its reward models.

Built-in reward functions (`score.reward_funcs`), each `fn(completions, **columns) ->
list[float]` under TRL's contract (stages/score.py), comparing a completion with the
`answer` column of its row and returning 1.0 or 0.0:

    exact_match     the completion, stripped, equals `answer` (stripped)
    numeric_match   the last number in the completion (commas removed) equals `answer` as a
                    number, within 1e-6 relative
    math_verify     the completion's final answer is mathematically equal to `answer`, by
                    the math-verify library (HF's Math-Verify, as TRL's `accuracy_reward`):
                    `\\boxed{}` and LaTeX answers and plain numbers, equivalent forms count
                    (`\\boxed{\\frac{1}{2}}` vs `0.5`, `\\boxed{2x+2}` vs `2(x+1)`)
    boxed_format    the completion holds exactly one non-empty `\\boxed{...}` (format only;
                    needs no `answer`)

Each accepts `completions` as plain strings or in TRL's conversational form (one list of
messages per completion, `[{"role": "assistant", "content": text}]`): `completion_text`
takes a completion's text either way, so a user function can use it too.

Reward models (`score.reward_models`): local folders of `AutoModelForSequenceClassification`
checkpoints with their tokenizer, scored as TRL's GRPOTrainer scores them (`logits[:, 0]`
of the prompt and completion as one text); see `score_with_model`. Checking a folder and
computing its digest read only files: torch and transformers are imported only to score.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from pathlib import Path

import pyarrow as pa

from pipeline.errors import EqLenError
from pipeline.registry import Registry

REWARDS: Registry = Registry("reward function", "score.reward_funcs")


# ------------------------------------------------------------------ completions and prompts


def completion_text(completion) -> str:
    """The text of one completion: a string as it is; TRL's conversational form (a list of
    messages, `[{"role": "assistant", "content": text}]`) as the concatenated `content` of
    its messages (one message, in what the score stage passes)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(m) for m in completion)
    return "" if completion is None else str(completion)


def is_conversational_type(t: pa.DataType) -> bool:
    """Whether an Arrow `prompt` column holds TRL's conversational prompts: a list of
    messages, `list<struct<role: string, content: string>>`."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    return pa.types.is_struct(v) and {"role", "content"} <= {
        v.field(i).name for i in range(v.num_fields)
    }


def as_completions(texts: list[str], conversational: bool) -> list:
    """Completions as reward functions receive them: the texts, or (for conversational
    prompts) one assistant message per completion, exactly as TRL's GRPOTrainer passes them."""
    if conversational:
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def prompt_text(prompt) -> str:
    """A prompt as plain text: a string as it is, a list of messages as their contents
    joined by newlines (what a reward model without a chat template reads)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(completion_text(m) for m in prompt or [])


# ------------------------------------------------------------------ built-in functions


def _answers(columns: dict) -> list[str]:
    # A missing column is reported by call_reward as the KeyError of a column lookup.
    if "answer" not in columns:
        raise KeyError("answer")
    return [str(a).strip() for a in columns["answer"]]


@REWARDS.register("exact_match")
def exact_match(completions: list, **columns) -> list[float]:
    answers = _answers(columns)
    return [float(completion_text(c).strip() == a) for c, a in zip(completions, answers)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@REWARDS.register("numeric_match")
def numeric_match(completions: list, **columns) -> list[float]:
    answers = _answers(columns)
    out = []
    for c, a in zip(completions, answers):
        found = _NUMBER.findall(completion_text(c).replace(",", ""))
        try:
            ok = bool(found) and abs(float(found[-1]) - float(a)) <= 1e-6 * max(1.0, abs(float(a)))
        except ValueError:
            ok = False
        out.append(float(ok))
    return out


# math-verify's own timeouts use signal.alarm, which works only in the main thread (a
# Prefect task runs in a worker thread): there, as TRL's accuracy_reward does, they are
# off. Seconds per parse / per comparison otherwise; a row that times out scores 0.0.
PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S = 5, 5
_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")


def gold_text(answer: str) -> str:
    """The gold answer as math-verify reads it: after GSM8K's `####` marker (the text after
    the last one, thousands separators removed), and wrapped in `$...$` when it has no LaTeX
    delimiters of its own, so a bare `2(x+1)` or `0.5` is read as one LaTeX expression."""
    a = str(answer).strip()
    if "####" in a:
        a = a.rsplit("####", 1)[1].strip().replace(",", "")
    if a and not any(d in a for d in _LATEX_DELIMITERS):
        a = f"${a}$"
    return a


@REWARDS.register("math_verify")
def math_verify_reward(completions: list, **columns) -> list[float]:
    """1.0 when the completion's answer equals `answer` by math-verify, else 0.0.

    The gold answer (`gold_text`) must parse to a math expression; one that does not (empty,
    malformed LaTeX such as `\\frac{1}{`, text math-verify cannot read) scores 0.0 for its
    row, as no completion can be verified against it (TRL's accuracy_reward returns None
    there; a NaN reward cannot be trained on here). The completion is parsed as TRL does
    (LaTeX with `\\boxed{}` tried first, units normalised) plus plain expressions, so
    `\\boxed{1/2}`, `$\\frac{1}{2}$` and a trailing `... is 0.5` are all read; the first
    match in that order counts (the last `\\boxed{}`, else the last answer-like expression).
    Free-text answers that are not math (`Monday`) parse as products of symbols: use
    exact_match for those."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    answers = _answers(columns)
    main = threading.current_thread() is threading.main_thread()
    parse_t, verify_t = (PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S) if main else (None, None)
    if not main:  # the "timeout is disabled" warning, which we mean
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    pred_config = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True), boxed_match_priority=0
        ),
        ExprExtractionConfig(),
    ]
    golds: dict[str, list] = {}
    out = []
    for c, a in zip(completions, answers):
        if a not in golds:
            # no_fallback: only expressions math-verify parsed, never the raw string.
            golds[a] = parse(gold_text(a), fallback_mode="no_fallback", parsing_timeout=parse_t)
        gold = golds[a]
        if not gold:
            out.append(0.0)
            continue
        pred = parse(
            completion_text(c),
            extraction_config=pred_config,
            extraction_mode="first_match",
            parsing_timeout=parse_t,
        )
        out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=verify_t)))
    return out


def boxed_contents(text: str) -> list[str | None]:
    """The content of every `\\boxed` command in text, in order: the text of its `{...}`
    group (braces balanced; `\\{` and `\\}` do not count), or None where the command has no
    group or its braces never close."""
    out: list[str | None] = []
    for m in re.finditer(r"\\boxed(?![A-Za-z])\s*", text):
        i = m.end()
        if i >= len(text) or text[i] != "{":
            out.append(None)
            continue
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2  # an escaped character, \{ and \} included
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        out.append(text[i + 1 : j] if depth == 0 and j < len(text) else None)
    return out


@REWARDS.register("boxed_format")
def boxed_format(completions: list, **columns) -> list[float]:
    """1.0 when the completion holds exactly one `\\boxed` command and it is followed by a
    `{...}` group whose braces balance (`\\{`, `\\}` are not braces) and whose content is
    not blank; else 0.0 (no box, two boxes, a nested box, `\\boxed{}` or `\\boxed{ }`, an
    unclosed `\\boxed{1`). Spaces may separate `\\boxed` and `{`. Needs no column."""
    out = []
    for c in completions:
        found = boxed_contents(completion_text(c))
        out.append(float(len(found) == 1 and bool(found[0] and found[0].strip())))
    return out


# ------------------------------------------------------------------ reward models


class RewardModelError(EqLenError, ValueError):
    """A reward model folder that cannot be used; the message names it and what to do."""


_HINT = (
    "give the folder of a sequence-classification reward model with one output "
    "(AutoModelForSequenceClassification, num_labels=1) saved with "
    "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
)


def model_columns(models: list[str], taken: set[str]) -> dict[str, str]:
    """{entry of score.reward_models: its column `reward_<folder name>`}, numbered
    (`_2`, ...) where it would equal a reward function's column or another model's."""
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise RewardModelError(
            f"score.reward_models lists {', '.join(map(repr, twice))} more than once; give "
            "each model once (score.reward_weights weighs it)"
        )
    used, out = set(taken), {}
    for m in models:
        base = "reward_" + re.sub(r"[^0-9A-Za-z_]+", "_", Path(m).expanduser().resolve().name)
        col, k = base, 1
        while col in used:
            k += 1
            col = f"{base}_{k}"
        used.add(col)
        out[m] = col
    return out


def check_model_folder(folder: str | Path) -> dict:
    """Check that `folder` holds a sequence-classification model with one output and a
    tokenizer; return its config.json. Reads only files (no torch): the preflight can call it."""
    from pipeline.models import ModelError, check_folder

    p = Path(folder).expanduser()
    what = f"score.reward_models: reward model {p}"
    if not p.exists():
        raise RewardModelError(f"{what} does not exist; {_HINT}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise RewardModelError(
            f"{what} is not a Hugging Face model folder "
            f"({'a file' if not p.is_dir() else 'no config.json'}); {_HINT}"
        )
    try:
        config = check_folder(p, what=what)
    except ModelError as e:
        raise RewardModelError(str(e)) from None
    arch = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in arch):
        raise RewardModelError(
            f"{what} is not a sequence-classification model (config.json architectures: "
            f"{', '.join(map(str, arch)) or 'none'}); a causal LM loaded as one would score "
            f"with an untrained, random head. {_HINT[0].upper()}{_HINT[1:]}."
        )
    # transformers writes id2label unless it is its default, 2 labels.
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    if labels != 1:
        raise RewardModelError(
            f"{what} outputs {labels} scores per row (num_labels={labels}), not one; a "
            "reward model has num_labels=1: train or save it with num_labels=1"
        )
    return config


def _stats(folder: Path) -> tuple:
    return tuple(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    )


@functools.cache
def _digest(folder: str, stats: tuple) -> str:
    from pipeline.cache import folder_digest

    return folder_digest(folder)[:16]


def model_digest(folder: str | Path) -> str:
    """Content digest of a reward model folder (pipeline.cache.folder_digest: every file's
    name and bytes), memoised per the files' names, sizes and mtimes so that computing the
    keys of many iterations hashes the weights once per process; 'missing' for a folder
    that does not exist (the stage then fails naming it)."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        return "missing"
    return _digest(str(p.resolve()), _stats(p))


def model_texts(tokenizer, prompts: list, completions: list) -> list[str]:
    """The texts a reward model scores, as TRL's GRPOTrainer builds them: for conversational
    prompts the tokenizer's chat template over the prompt's messages plus the assistant
    message (without a chat template: the messages' contents joined by newlines, then the
    completion); for string prompts, prompt + completion."""
    out = []
    for p, c in zip(prompts, completions):
        if isinstance(p, list) and getattr(tokenizer, "chat_template", None):
            messages = list(p) + (
                list(c) if isinstance(c, list) else [{"role": "assistant", "content": c}]
            )
            out.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            out.append(prompt_text(p) + completion_text(c))
    return out


def load_model(folder: str | Path, device):
    """(model, tokenizer, max_length) of a reward model folder, the model in eval mode on
    `device` in the dtype it was saved in; any unusable folder is a RewardModelError."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models import max_positions

    p = Path(folder).expanduser()
    config = check_model_folder(p)
    what = f"score.reward_models: reward model {p}"
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            p, dtype="auto", output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise RewardModelError(
            f"{what} cannot be loaded as a sequence-classification model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {_HINT}"
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardModelError(
            f"{what}: its weights lack {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}, which would be random: it is not a "
            f"trained sequence-classification model. {_HINT[0].upper()}{_HINT[1:]}."
        )
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise RewardModelError(f"{what}: no usable tokenizer ({e}); {_HINT}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise RewardModelError(
                f"{what}: the tokenizer has neither a pad nor an EOS token, so rows cannot be "
                "batched; set tokenizer.pad_token and save it again"
            )
        tok.pad_token = tok.eos_token  # TRL's convention
    # The classifier reads the last non-pad token, found through the config's pad id.
    model.config.pad_token_id = tok.pad_token_id
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    # Truncate on the left: the completion's end, where the score is read, is what matters.
    tok.truncation_side = "left"
    found = max_positions(config)
    limit = found[1] if found else None
    if limit is None and 0 < getattr(tok, "model_max_length", 0) < 1_000_000:
        limit = tok.model_max_length
    return model.to(device).eval(), tok, limit


def score_with_model(
    folder: str | Path, prompts: list, completions: list, device, batch_size: int
) -> list[float]:
    """One score per row from a reward model: `logits[:, 0]` of each text of `model_texts`,
    tokenized as TRL does (no special tokens added: a chat template writes its own; padded
    on the right; truncated on the left at the model's positions), in batches of
    `batch_size` under torch.no_grad. The model is loaded once and freed after."""
    import torch

    model, tok, limit = load_model(folder, device)
    texts = model_texts(tok, prompts, completions)
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), max(1, batch_size)):
                batch = texts[start : start + batch_size]
                enc = tok(
                    batch,
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                    truncation=limit is not None,
                    max_length=limit,
                )
                logits = model(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                ).logits
                if logits.ndim != 2 or logits.shape[0] != len(batch) or logits.shape[1] != 1:
                    raise RewardModelError(
                        f"score.reward_models: reward model {Path(folder).expanduser()} "
                        f"returned logits of shape {tuple(logits.shape)} for {len(batch)} "
                        f"rows, not one score per row ({len(batch)}, 1); {_HINT}"
                    )
                out += logits[:, 0].float().cpu().tolist()
    finally:
        del model
        if getattr(device, "type", str(device)) == "cuda":
            torch.cuda.empty_cache()
    return out


def model_key(models: list[str]) -> dict[str, str]:
    """{folder: content digest}: what the score stage's key holds for its reward models."""
    return {m: model_digest(m) for m in models}
