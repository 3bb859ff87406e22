"""The second built-in task, "pad": reverse the digits, where wrong answers can grow.

The demo task (:mod:`pipeline.demo`) has wrong answers at most 4 digits longer
than right ones, so GRPO's length bias there only makes long wrong answers be
unlearned more slowly; they cannot grow. This task is built so that they can.

The prompt ``"pad 4821="`` has the single correct response ``"1284"`` + EOS
(1 to 6 digits from 1-9, so correct responses are 2 to 7 tokens) and is graded
by the pipeline's default reward, ``exact_match``. The warm-started policy has
one extra bad habit: when it writes a wrong digit it often goes on with *filler*
digits instead of the rest of the answer, a run of geometrically distributed
length (stop probability :data:`FILLER_STOP` per token, mean ~15, at most
:data:`MAX_FILLER` in the warm start). Nothing bounds that run but
``generate.max_new_tokens`` (64 for this task).

Why plain GRPO (``update.loss_agg=seq_mean_token_mean``) lengthens the wrong
answers while Dr. GRPO (``seq_mean_token_sum_norm``) does not: GRPO gives every
token of response ``o`` the weight ``A / |o|``. Right after a wrong digit the
response is wrong whatever comes next (``A < 0`` for all its continuations), and
the policy chooses between finishing the answer (short) and filler (long); in
each filler state it chooses between another filler digit and EOS. In both
choices the shorter option's token is pushed down by ``|A| / |o_short|`` and the
longer one's only by ``|A| / |o_long|``, so probability moves to the longer
option: more wrong answers turn to filler and the filler runs get longer, the
more they are penalised. With a constant normaliser (Dr. GRPO) every choice gets
the same weight per token, the expected push on these choices is zero, and the
padding is not favoured. Padding starts *at* the wrong digit, never after a
right one, so the choice is made among wrong responses only: when the warm start
padded after a whole wrong answer, the state before EOS was shared with right
answers, whose EOS RL pushes up, and the padded share fell under both
aggregations.

Measured (docs/tasks.md, README "Experiment"): under GRPO the mean length of
incorrect responses (score metric ``mean_len_incorrect``) grows from ~9 to ~12
tokens in 25 iterations on every seed, the within-prompt gap ``len_gap`` from
~4 to ~7, the share of wrong answers that pad and the filler runs (~14 -> ~20
digits) both grow; under Dr. GRPO all of them fall, at the same reward.

The warm start (:func:`sft_target`): plain cross-entropy on targets that are
right with probability ``1 - error_rate`` (0.5 wrong) and otherwise one wrong
digit at a random position followed by filler (:data:`PAD_RATE`) or by the rest
of the answer, or one digit left out. Sampling at temperature 1 it is right
~35% of the time and ~17% of its responses are padded.

Designs tried and left out (25 iterations, same settings):

* filler after the *whole* wrong answer (the first version of this task): the
  filler grew under GRPO (~14 -> ~20 digits) but the padded share of wrong
  answers fell (0.33 -> 0.10-0.18), so the raw ``mean_len_incorrect`` did not
  rise (9.3 -> 8.2); the reason is above. The same with padding rate 0.5 at the
  wrong digit: raw length up, but by less (+1.4 to +2.1 tokens, 3 seeds);
* filler *symbols* (``~ _ *``): a token that only ever occurs in wrong
  responses gets a gradient of one sign in every update; Adam, normalising per
  parameter, moves it at full speed whatever the aggregation, so the padding
  was unlearned. Hence filler *digits*, which every right answer also uses, so
  the weighting decides;
* filler in front of the answer (a scratchpad): a 2-layer model learns the
  reversal at fixed offsets from ``=``; filler in front would shift them and
  need a far longer warm start.

Conventions as in :mod:`pipeline.demo`: no special tokens are added when
encoding, every digit is one token, a response is the generated ids up to and
including the first EOS.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.demo import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    collate,
    encode_prompt,
    encode_response,
    is_correct,
    sample_responses,
    warm_start,
)
from pipeline.lazy import lazy_import

# torch bound lazily, transformers imported in the functions that build or load a model: a
# cached run needs only the prompts of this module, and neither library.
torch = lazy_import("torch")
if TYPE_CHECKING:
    import transformers

# Prompt (<= 10 tokens) + 64 new tokens must fit, with room to spare for longer budgets.
MAX_POSITIONS = 96
MIN_DIGITS, MAX_DIGITS = 1, 6
DEFAULT_ERROR_RATE = 0.5
# The filler: random digits (one token each). Digits, not a symbol of its own: a token that
# only ever occurs in wrong responses gets a negative gradient of one sign in every update,
# which Adam (normalising per parameter) turns into a full-lr step whatever the loss
# aggregation, and the length bias would have nothing to act on. Digits also make up every
# right answer, so their weights see both signs and the aggregation's weighting decides.
FILLER = "123456789"
# Per-token stop probability of the warm start's padding (geometric, mean ~15), and its
# cap: the warm start never pads past MAX_FILLER, RL can (up to generate.max_new_tokens).
FILLER_STOP = 0.06
MAX_FILLER = 40
# generate.max_new_tokens this task is meant for (also the shipped generation_config's).
MAX_NEW_TOKENS = 64


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def _draw_digits(rng: random.Random, min_digits: int = MIN_DIGITS, max_digits: int = MAX_DIGITS):
    """Digits 1-9 only: no zero, so no reversal has a leading zero to argue about."""
    n = rng.randint(min_digits, max_digits)
    return "".join(str(rng.randint(1, 9)) for _ in range(n))


def format_prompt(digits: str) -> str:
    return f"pad {digits}="


def make_pad_prompts(n: int, seed: int = 0) -> pa.Table:
    """``n`` prompts (``prompt_id``, ``prompt``, ``answer``), deterministic given ``seed``."""
    rng = random.Random(seed)
    ids, prompts, answers = [], [], []
    for i in range(n):
        digits = _draw_digits(rng)
        ids.append(f"pad-{i:06d}")
        prompts.append(format_prompt(digits))
        answers.append(digits[::-1])
    schema = pa.schema(
        [("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string())]
    )
    return pa.table([ids, prompts, answers], schema=schema)


# --------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE as the demo's (digits split individually, full byte alphabet), trained
    on prompts and answers only, so the filler characters stay single-byte tokens."""
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
    rng = random.Random(4321)  # fixed corpus -> identical vocab on every build
    corpus = [format_prompt(_draw_digits(rng)) + _draw_digits(rng) for _ in range(2000)]
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


def pad_model_dir() -> Path:
    """The shipped warm-started checkpoint (model + tokenizer)."""
    from pipeline.models import PAD_MODEL_DIR

    return PAD_MODEL_DIR


# The warm start's wrong targets: one digit at position i is wrong. With probability
# PAD_RATE the response turns to filler right after that digit ("swap+pad"); otherwise it
# finishes the answer (``swap``: one digit replaced) or skips the digit (``drop``, with
# probability DROP_RATE). Padding starts *at* the error, never after a right digit: the
# model can see there that its response is already wrong (the digit it wrote is not the
# mirrored prompt digit), so the choice between filler and the rest of the answer is made
# among wrong responses only, where the loss aggregation decides it (module docstring).
PAD_RATE = 0.35
DROP_RATE = 0.4
ERROR_MODES = ("swap+pad", "swap", "drop")


def filler(rng: random.Random) -> str:
    """1..MAX_FILLER filler tokens, stopping with probability FILLER_STOP after each: a
    constant hazard, so the model learns one go-on-or-stop choice per filler state."""
    n = 1
    while n < MAX_FILLER and rng.random() >= FILLER_STOP:
        n += 1
    return "".join(rng.choice(FILLER) for _ in range(n))


def sft_target(digits: str, rng: random.Random, error_rate: float) -> tuple[str, str]:
    """The warm-start target for ``digits`` and its mode: ``"correct"``, or with probability
    ``error_rate`` one of :data:`ERROR_MODES`: the right digits up to position ``i``, a wrong
    digit there, then :func:`filler` (``swap+pad``, probability :data:`PAD_RATE`), or the
    rest of the answer (``swap``), or the answer with digit ``i`` left out (``drop``,
    probability :data:`DROP_RATE` of the unpadded errors; a swap for a single digit)."""
    answer = digits[::-1]
    if rng.random() >= error_rate:
        return answer, "correct"
    i = rng.randrange(len(answer))
    other = rng.choice([d for d in "123456789" if d != answer[i]])
    if rng.random() < PAD_RATE:
        return answer[:i] + other + filler(rng), "swap+pad"
    if rng.random() < DROP_RATE and len(answer) >= 2:
        return answer[:i] + answer[i + 1 :], "drop"
    return answer[:i] + other + answer[i + 1 :], "swap"


def _training_batch(tokenizer, rng: random.Random, batch_size: int, error_rate: float):
    examples = []
    for _ in range(batch_size):
        digits = _draw_digits(rng)
        target, _ = sft_target(digits, rng, error_rate)
        examples.append(
            (encode_prompt(tokenizer, format_prompt(digits)), encode_response(tokenizer, target))
        )
    return collate(examples)


def build_pad_model(
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 6e-3,
    batch_size: int = 64,
    error_rate: float = DEFAULT_ERROR_RATE,
    log_every: int = 100,
) -> Path:
    """Tokenizer + tiny Llama, warm-started on :func:`sft_target` targets (AdamW, linear
    warmup, cosine decay, as the demo's), saved to ``out_dir``. Deterministic given the
    arguments on a fixed thread count (the build uses 1: on a shared 2-core machine a second
    thread made each step ~10x slower)."""
    tokenizer = build_tokenizer()
    return warm_start(
        out_dir,
        tokenizer,
        lambda rng: _training_batch(tokenizer, rng, batch_size, error_rate),
        steps=steps,
        seed=seed,
        data_seed=seed + 20_011,  # training stream, distinct from the task's prompts
        lr=lr,
        threads=1,
        max_positions=MAX_POSITIONS,
        max_new_tokens=MAX_NEW_TOKENS,
        log_every=log_every,
    )


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(
    model_dir: str | Path = None,
    n_prompts: int = 256,
    samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict:
    """Sampled ``accuracy``, ``pad_rate`` (share of responses longer than the answer),
    ``mean_filler`` (how much longer, over those), ``mean_len_correct`` /
    ``mean_len_incorrect`` (tokens incl. EOS; NaN when none) and ``n_samples``."""
    rows = make_pad_prompts(n_prompts, seed=seed).to_pylist()
    oks, fills, lengths = [], [], {True: [], False: []}
    for row, text, finished, n_tokens in sample_responses(
        model_dir or pad_model_dir(), rows, samples, temperature, seed, max_new_tokens, threads=1
    ):
        ok = is_correct(text, row["answer"], finished)
        oks.append(ok)
        if len(text) > len(row["answer"]):  # padded (a drop + 1 filler digit escapes)
            fills.append(len(text) - len(row["answer"]))
        lengths[ok].append(n_tokens)

    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "accuracy": mean(oks),
        "pad_rate": len(fills) / len(oks),
        "mean_filler": mean(fills),
        "mean_len_correct": mean(lengths[True]),
        "mean_len_incorrect": mean(lengths[False]),
        "n_samples": len(oks),
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

DEFAULT_STEPS = 1500


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pad_task", description=__doc__.split("\n")[0]
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--build", action="store_true", help="build and warm-start the model")
    what.add_argument("--eval", action="store_true", help="sampled accuracy and lengths")
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: shipped)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--error-rate", type=float, default=DEFAULT_ERROR_RATE)
    parser.add_argument("--n-prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    folder = args.out or pad_model_dir()
    if args.build:
        t0 = time.perf_counter()
        path = build_pad_model(folder, steps=args.steps, seed=args.seed, error_rate=args.error_rate)
        print(f"saved {path} in {time.perf_counter() - t0:.1f}s")
        return
    res = evaluate(folder, args.n_prompts, args.samples, args.temperature, args.seed)
    print(
        f"accuracy {res['accuracy']:.3f} over {res['n_samples']} samples  pad rate "
        f"{res['pad_rate']:.3f}  mean filler {res['mean_filler']:.2f}  mean length correct "
        f"{res['mean_len_correct']:.2f}  incorrect {res['mean_len_incorrect']:.2f}"
    )


if __name__ == "__main__":
    main()
