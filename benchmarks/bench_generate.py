"""Benchmark: the dual-track lock-step engine against plain transformers `generate`.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 64] [--group 8] [--repeats 3]

On the shipped demo policy, for rounds K = 1, 2, 4, 8 it measures
- the effective token ratio of the `eqlen` pair strategy (tokens in units / generated),
- tokens/s of the engine, and as baseline, in the same run, `model.generate` sampling the
  same prompts x group size with the same budget (ratio = engine / generate),
- prefill tokens saved by KV copy: each newcomer would otherwise re-prefill its prompt and
  inherited prefix (what a request-based engine without prefix caching pays).
Medians over --repeats runs. The figures in README.md come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flows import report
from pipeline import config
from pipeline.demo import demo_model_dir, make_demo_prompts
from pipeline.models import load_policy, load_tokenizer
from stages import hf_engine, pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = (
        load_policy(demo_model_dir(), torch.device("cpu")),
        load_tokenizer(demo_model_dir()),
    )
    texts = make_demo_prompts(args.prompts, seed=123).column("prompt").to_pylist()
    prompts = [tok(t)["input_ids"] for t in texts]
    cfg = config.load(None, ["pair.strategy=eqlen"])

    def plain_generate(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        enc = tok(texts, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                num_return_sequences=args.group,
                pad_token_id=tok.pad_token_id,
            )
        dt = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :]
        # Tokens up to and including the first EOS (what the engine counts).
        is_eos = (new == tok.eos_token_id).int()
        ended = is_eos.cumsum(-1) - is_eos > 0
        return int((~ended).sum()), dt

    print(
        f"machine: {report.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}; {args.prompts} prompts x {args.group} tracks, "
        f"max_new_tokens {args.max_new_tokens}"
    )
    base = [plain_generate(s) for s in range(args.repeats)]
    base_tps = statistics.median(n / dt for n, dt in base)
    print(
        f"baseline model.generate: {base_tps:,.0f} tokens/s "
        f"({statistics.median(n for n, _ in base):.0f} tokens)"
    )
    print(
        "| rounds | effective token ratio | engine tokens/s | vs generate | kv copies | "
        "prefill tokens saved |"
    )
    print("|---|---|---|---|---|---|")
    for rounds in (1, 2, 4, 8):
        runs = []
        for s in range(args.repeats):
            t0 = time.perf_counter()
            tracks, st = hf_engine.sample_tracks(
                model,
                prompts,
                group_size=args.group,
                rounds=rounds,
                max_new_tokens=args.max_new_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                generator=torch.Generator().manual_seed(s),
            )
            dt = time.perf_counter() - t0
            rows = [dict(t.row(prompts), reward=0.0) for t in tracks]
            m = pair.summarize(pair.build_units(rows, cfg), rows)
            saved = sum(
                len(prompts[t.prompt_index]) + t.own_start
                for t in tracks
                if t.parent_track_id is not None
            )
            runs.append((m["effective_token_ratio"], st.generated_tokens / dt, st.kv_copies, saved))
        eff, tps, copies, saved = (statistics.median(x) for x in zip(*runs))
        print(
            f"| {rounds} | {eff:.3f} | {tps:,.0f} | {tps / base_tps:.2f}x | {copies:.0f} | "
            f"{saved:.0f} |"
        )


if __name__ == "__main__":
    main()
