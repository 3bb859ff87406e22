"""The embedded demo task, "reverse the digits", and its tiny warm-started model.

EqLen studies how group-relative RL (GRPO, GSPO, RLOO) treats responses of
different lengths, so the project needs a task it can run end to end on a
laptop CPU, with no model hub, whose *correct* answers nonetheless vary in
length. Reversing a digit string is such a task: the prompt ``"rev 4821="``
has the single correct response ``"1284"`` followed by EOS, and because the
number of digits is drawn uniformly from ``min_digits..max_digits`` (1..8 by
default) correct responses range from 2 to 9 tokens. Grading is exact string
comparison, so rewards are unambiguous.

The policy is a Llama-shaped causal LM small enough to ship inside the
repository (well under 2 MB). It is built here from scratch: a byte-level BPE
tokenizer in which every digit is its own token, and a supervised warm start.

The warm start is designed so that RL has something it can fix in a few dozen
steps. A model that simply lacks the skill (say, an SFT stopped early, which
reverses short numbers and fails long ones) gives RL nothing to sharpen: a
policy gradient cannot teach an 8-digit reversal in a few updates, and the
negative gradients on failed long answers even hurt the short ones. So the SFT
here runs long enough for the model to learn the reversal of every length
(greedy decoding is ~95% correct for 1..8 digits), but on *corrupted* targets:
with probability ``error_rate`` (0.6 by default) the target is wrong in one of
these error modes (:data:`ERROR_MODES`, :func:`sft_target`):

* ``ramble`` (60% of errors): the reversal followed by a repeat of its last
  1-4 digits -- a *longer* wrong answer (``1284`` -> ``128484``);
* ``drop`` (20%): the reversal with one digit left out -- *shorter*;
* ``swap`` (20%): the reversal with one digit replaced -- the *same* length.

The model learns this mixture of behaviours, so sampling at temperature 1.0
it is right about half the time (~48%, fairly evenly over 1..8 digits), and
each error comes from one wrong choice at one token -- another digit instead
of EOS, a skipped or changed digit -- which RL learns to suppress quickly
("sharpening"): with ``iterations=10 update.lr=5e-4 update.minibatches=4
data.prompts_per_iteration=128`` the mean reward rises from ~0.47 to ~0.9.
Because most errors are rambles, wrong responses are longer than right ones
on average (~6.6 vs ~5.3 tokens with EOS), so correctness correlates with
length -- exactly the situation whose bias we want to measure: a long wrong
response's negative advantage is spread over more tokens than a short right
response's positive one. (An ``echo`` mode, the digits unreversed, was tried
and left out: mixing copy and reversal made the model's own errors dominate.)

Conventions shared with the rest of the pipeline:

* The tokenizer adds no special tokens (no BOS, no EOS) when encoding text,
  so the model input for a prompt is just the prompt's token ids; see
  :func:`encode_prompt`. Any consumer that tokenizes the prompt text with
  default settings (HF ``tokenizer(text)``, vLLM) gets the same ids.
* A response is the generated token ids up to and including the first EOS;
  it is correct when it ended with EOS and its text equals the answer.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.lazy import lazy_import

# torch bound lazily, transformers imported in the functions that build or load a model: a
# cached run needs only the prompts of this module, and neither library.
torch = lazy_import("torch")
if TYPE_CHECKING:
    import transformers

PAD, EOS, BOS = "<pad>", "</s>", "<s>"
# Special tokens are given to the BPE trainer first, so their ids are fixed.
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
MAX_POSITIONS = 64
DEFAULT_ERROR_RATE = 0.6


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def _draw_digits(rng: random.Random, min_digits: int, max_digits: int) -> str:
    """A digit string of uniformly drawn length; no leading zero, so it reads
    as a number (its reversal may start with zero, which is fine)."""
    n = rng.randint(min_digits, max_digits)
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def format_prompt(digits: str) -> str:
    return f"rev {digits}="


def make_demo_prompts(n: int, seed: int = 0, min_digits: int = 1, max_digits: int = 8) -> pa.Table:
    """``n`` demo prompts as a table (``prompt_id``, ``prompt``, ``answer``).

    Deterministic given the arguments; the digit count is uniform over
    ``min_digits..max_digits``, so ``len(answer)`` is the digit count.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    ids, prompts, answers = [], [], []
    for i in range(n):
        digits = _draw_digits(rng, min_digits, max_digits)
        ids.append(f"demo-{i:06d}")
        prompts.append(format_prompt(digits))
        answers.append(digits[::-1])
    schema = pa.schema(
        [("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string())]
    )
    return pa.table([ids, prompts, answers], schema=schema)


def is_correct(response_text: str, answer: str, finished: bool = True) -> bool:
    """Exact match after stripping whitespace, as the score stage's ``exact_match``; a
    response cut off before EOS (``finished=False``) is wrong."""
    return finished and response_text.strip() == answer


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally on task text.

    The ``Digits(individual_digits=True)`` pre-tokenizer runs before the
    byte-level split, so BPE never merges digits: every digit is exactly one
    token and a response's length in tokens is its digit count (+1 for EOS).
    The full 256-byte alphabet is kept, so any text can still be encoded.
    Ids: ``<pad>`` = 0, ``</s>`` (EOS) = 1, ``<s>`` (BOS) = 2. No post-processor
    is set, so encoding never adds special tokens.
    """
    import transformers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(1234)  # fixed corpus -> identical vocab on every build
    corpus = [format_prompt(_draw_digits(rng, 1, 8)) + _draw_digits(rng, 1, 8) for _ in range(2000)]
    tok.train_from_iterator(corpus, trainer)
    assert (tok.token_to_id(PAD), tok.token_to_id(EOS), tok.token_to_id(BOS)) == (
        PAD_ID,
        EOS_ID,
        BOS_ID,
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def encode_prompt(tokenizer: transformers.PreTrainedTokenizerFast, text: str) -> list[int]:
    """The model input for a prompt: its token ids, with no BOS prepended.

    Every prompt begins with the same ``rev`` token, which already gives the
    model a fixed anchor, so a BOS would add nothing; leaving it out keeps
    this identical to what default tokenization (HF or vLLM) produces.
    """
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: transformers.PreTrainedTokenizerFast, answer: str) -> list[int]:
    """The target ids of a correct response: one token per digit, then EOS."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def demo_model_dir() -> Path:
    """The shipped warm-started checkpoint (model + tokenizer)."""
    from pipeline.models import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR


def _model_config(vocab_size: int, max_positions: int = MAX_POSITIONS) -> transformers.LlamaConfig:
    # head_dim = 64 / 2 = 32: some attention kernels (vLLM) refuse smaller heads. The pad
    # task (pipeline/pad_task.py) uses the same shape with more positions.
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )


# Error modes of the corrupted warm-start targets (see sft_target) and their
# relative weights: mostly longer than the answer, some shorter, some as long.
ERROR_MODES = {"ramble": 0.6, "drop": 0.2, "swap": 0.2}


def sft_target(digits: str, rng: random.Random, error_rate: float) -> tuple[str, str]:
    """The warm-start target for ``digits`` and its mode: ``"correct"`` (the
    reversal), or with probability ``error_rate`` one of :data:`ERROR_MODES`:

    * ``ramble``: the reversal, then a repeat of its last 1-4 digits (longer);
    * ``drop``: the reversal with one digit left out (shorter); a single digit
      cannot be dropped, so there the target stays correct;
    * ``swap``: the reversal with one digit replaced by another (same length).
    """
    answer = digits[::-1]
    if rng.random() >= error_rate:
        return answer, "correct"
    modes = list(ERROR_MODES)
    mode = rng.choices(modes, weights=[ERROR_MODES[m] for m in modes])[0]
    if mode == "ramble":
        k = rng.randint(1, min(4, len(answer)))
        return answer + answer[-k:], mode
    i = rng.randrange(len(answer))
    if mode == "swap":
        other = rng.choice([d for d in "0123456789" if d != answer[i]])
        return answer[:i] + other + answer[i + 1 :], mode
    if len(answer) < 2:
        return answer, "correct"
    return answer[:i] + answer[i + 1 :], mode


def _training_batch(
    tokenizer: transformers.PreTrainedTokenizerFast,
    rng: random.Random,
    batch_size: int,
    max_digits: int,
    error_rate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh batch of (prompt + response) sequences (:func:`collate`). Targets are
    corrupted with probability ``error_rate`` (see :func:`sft_target`)."""
    examples = []
    for _ in range(batch_size):
        digits = _draw_digits(rng, 1, max_digits)
        target, _ = sft_target(digits, rng, error_rate)
        examples.append(
            (encode_prompt(tokenizer, format_prompt(digits)), encode_response(tokenizer, target))
        )
    return collate(examples)


def collate(
    examples: list[tuple[list[int], list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) pairs -> input ids, attention mask and labels, left-padded
    like at generation time; the loss sees only response tokens and EOS."""
    seqs = [p + r for p, r in examples]
    labels = [[-100] * len(p) + r for p, r in examples]
    width, n = max(len(s) for s in seqs), len(seqs)
    ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    lab = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, lbl) in enumerate(zip(seqs, labels)):
        ids[i, width - len(s) :] = torch.tensor(s)
        lab[i, width - len(s) :] = torch.tensor(lbl)
        mask[i, width - len(s) :] = 1
    return ids, mask, lab


def _max_new_tokens(max_digits: int) -> int:
    # Room for the longest rambling answer (max_digits + 4 digits, EOS) and a
    # few more; 16 for 8 digits, as the pipeline's generate.max_new_tokens.
    return max_digits + 8


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Positions count from the first real token, as `generate` does with left padding.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build_demo_model(
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 6e-3,
    batch_size: int = 64,
    max_digits: int = 8,
    error_rate: float = DEFAULT_ERROR_RATE,
    log_every: int = 50,
) -> Path:
    """Build the tokenizer and a tiny Llama, warm-start it, save both to ``out_dir``.

    The warm start is plain next-token cross-entropy on the response tokens
    and EOS of freshly sampled examples whose targets are corrupted with
    probability ``error_rate`` (see :func:`sft_target` and the module
    docstring), AdamW with a short linear warmup and cosine decay. ``steps``
    should be long enough for the model to learn the reversal itself
    (:data:`DEFAULT_STEPS`, ~2.5 minutes on 2 CPU threads); ``error_rate``
    then sets how often the sampled policy is right (~50 s here). Deterministic given
    the arguments on one CPU model and thread count (the build uses 2); other CPUs' kernels
    round differently: the shipped model was built on an AMD EPYC, and a build on an Intel
    Xeon differs in its bits.
    """
    tokenizer = build_tokenizer()
    return warm_start(
        out_dir,
        tokenizer,
        lambda rng: _training_batch(tokenizer, rng, batch_size, max_digits, error_rate),
        steps=steps,
        seed=seed,
        data_seed=seed + 10_007,  # training data stream, distinct from eval prompts
        lr=lr,
        threads=2,
        max_positions=MAX_POSITIONS,
        max_new_tokens=_max_new_tokens(max_digits),
        log_every=log_every,
    )


def warm_start(
    out_dir: str | Path,
    tokenizer: transformers.PreTrainedTokenizerFast,
    next_batch: Callable[[random.Random], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    seed: int,
    data_seed: int,
    lr: float,
    threads: int,
    max_positions: int,
    max_new_tokens: int,
    log_every: int,
) -> Path:
    """A tiny Llama (:func:`_model_config`) trained with cross-entropy on ``next_batch(rng)``
    batches (:func:`collate`), AdamW with a linear warmup over 5% of the steps and cosine
    decay, saved with ``tokenizer`` and a sampling generation config to ``out_dir``. Shared
    by the built-in tasks' builds (this module's and pipeline/pad_task.py's); deterministic
    given the arguments, on ``threads`` torch threads."""
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    model = transformers.LlamaForCausalLM(_model_config(len(tokenizer), max_positions))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(data_seed)
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        ids, mask, labels = next_batch(rng)
        loss = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), labels=labels
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(
                f"step {step + 1}/{steps}  loss {running / n:.4f}  {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            running = 0.0

    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def sample_responses(
    model_dir: str | Path,
    rows: list[dict],
    samples: int,
    temperature: float,
    seed: int,
    max_new_tokens: int,
    threads: int,
) -> list[tuple[dict, str, bool, int]]:
    """``samples`` responses per prompt row, sampled with plain HF ``generate`` (an
    independent check of the pipeline's engines), as (row, text, finished, tokens incl.
    EOS); shared by the built-in tasks' ``evaluate``."""
    import transformers

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    out_rows = []
    for start in range(0, len(rows), 128):
        chunk = rows[start : start + 128]
        batch = tokenizer.pad(
            {"input_ids": [encode_prompt(tokenizer, r["prompt"]) for r in chunk]},
            return_tensors="pt",
        )
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
        )
        for i, toks in enumerate(out[:, batch["input_ids"].shape[1] :].tolist()):
            finished = EOS_ID in toks
            resp = toks[: toks.index(EOS_ID) + 1] if finished else toks
            text = tokenizer.decode(resp, skip_special_tokens=True)
            # num_return_sequences repeats each prompt in place
            out_rows.append((chunk[i // samples], text, finished, len(resp)))
    return out_rows


def evaluate(
    model_dir: str | Path,
    n_prompts: int = 256,
    samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    max_digits: int = 8,
) -> dict:
    """Sample ``samples`` responses per demo prompt with plain ``generate``.

    Returns ``accuracy``, ``accuracy_by_digits`` ({digit count: accuracy}),
    ``mean_len_correct`` / ``mean_len_incorrect`` (response tokens incl. EOS;
    NaN when there is no such sample) and ``n_samples``.
    """
    table = make_demo_prompts(n_prompts, seed=seed, max_digits=max_digits).to_pylist()
    correct: dict[int, list[bool]] = {}
    lengths: dict[bool, list[int]] = {True: [], False: []}
    for row, text, finished, n_tokens in sample_responses(
        model_dir, table, samples, temperature, seed, _max_new_tokens(max_digits), threads=2
    ):
        ok = is_correct(text, row["answer"], finished)
        correct.setdefault(len(row["answer"]), []).append(ok)
        lengths[ok].append(n_tokens)

    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    everything = [ok for oks in correct.values() for ok in oks]
    return {
        "accuracy": mean(everything),
        "accuracy_by_digits": {k: mean(v) for k, v in sorted(correct.items())},
        "mean_len_correct": mean(lengths[True]),
        "mean_len_incorrect": mean(lengths[False]),
        "n_samples": len(everything),
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

DEFAULT_STEPS = 2000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and warm-start the demo model")
    b.add_argument("--out", type=Path, default=demo_model_dir())
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--error-rate", type=float, default=DEFAULT_ERROR_RATE)
    e = sub.add_parser("eval", help="sampled accuracy of a model directory")
    e.add_argument("model_dir", type=Path, nargs="?", default=demo_model_dir())
    e.add_argument("--n-prompts", type=int, default=256)
    e.add_argument("--samples", type=int, default=4)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        t0 = time.perf_counter()
        path = build_demo_model(
            args.out, steps=args.steps, seed=args.seed, error_rate=args.error_rate
        )
        print(f"saved {path} in {time.perf_counter() - t0:.1f}s")
    else:
        res = evaluate(args.model_dir, args.n_prompts, args.samples, args.temperature, args.seed)
        print(f"accuracy {res['accuracy']:.3f} over {res['n_samples']} samples")
        for k, v in res["accuracy_by_digits"].items():
            print(f"  {k} digits: {v:.3f}")
        print(
            f"mean length correct {res['mean_len_correct']:.2f}  "
            f"incorrect {res['mean_len_incorrect']:.2f}"
        )


if __name__ == "__main__":
    main()
