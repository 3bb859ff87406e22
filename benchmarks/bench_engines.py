"""Benchmark: the vLLM rollout engine against the transformers (hf) engine, in one run.

    .venv/bin/python benchmarks/bench_engines.py [--prompts 32] [--group 8] [--repeats 3]

Both engines sample the same prompts x group size with the same budget through
`stages.hf_engine.sample_tracks` and `stages.vllm_engine.sample_tracks` (what
`generate.engine=hf|vllm` run), for rounds K = 1 and 4, on two models:

- `demo`: the shipped 165k-parameter demo policy on demo prompts (~10 tokens), T = 16;
- `medium`: a randomly initialised ~11M-parameter Llama (hidden 384, 6 layers) built here,
  whose EOS row is scaled so responses end at varied lengths (a random model almost never
  says EOS), on random 48-token prompts, T = 64.

Printed per model and rounds: generated tokens/s of each engine (median over --repeats
after one warm-up), the ratio vllm / hf measured in the same run, and vLLM's prefix-cache
reuse: prompt tokens served from cache in all requests, and in the newcomers' requests
(prompt + inherited prefix) — the prefill that prefix caching saves on inheritance. Each
model runs in its own subprocess (one vLLM engine per process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows import report  # noqa: E402


def build_medium(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=64,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a large-norm EOS row: EOS wins at a fair share of positions
        model.lm_head.weight[tok.eos_token_id] *= 6.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measure(model_name: str, args) -> dict:
    from pipeline import config
    from pipeline.demo import demo_model_dir, make_demo_prompts
    from pipeline.models import load_policy, load_tokenizer
    from stages import hf_engine, vllm_engine

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="eqlen-bench-"))
    if model_name == "demo":
        mdir, T, max_prompt = demo_model_dir(), 16, 64
        tok = load_tokenizer(mdir)
        prompts = [
            tok(t)["input_ids"]
            for t in make_demo_prompts(args.prompts, seed=123).column("prompt").to_pylist()
        ]
    else:
        mdir, T, max_prompt = build_medium(tmp / "medium"), 64, 48
        tok = load_tokenizer(mdir)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, len(tok), (args.prompts, 48), generator=g).tolist()
    model = load_policy(mdir, torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    cfg = config.load(
        None, [f"data.max_prompt_tokens={max_prompt}", f"generate.max_new_tokens={T}"]
    )
    live, info = vllm_engine.live_engine(mdir, cfg.generate, max_prompt, 0, log=lambda *_: None)
    torch.set_num_threads(args.threads)
    common = dict(
        group_size=args.group,
        max_new_tokens=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_id=tok.eos_token_id,
    )

    def hf(rounds, seed):
        t0 = time.perf_counter()
        tracks, st = hf_engine.sample_tracks(
            model,
            prompts,
            rounds=rounds,
            pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(seed),
            **common,
        )
        return st, time.perf_counter() - t0

    def vl(rounds, seed):
        live.llm.reset_prefix_cache()  # each repeat starts cold, as a new iteration does
        t0 = time.perf_counter()
        tracks, st = vllm_engine.sample_tracks(
            live.llm, prompts, rounds=rounds, seed=seed, **common
        )
        return st, time.perf_counter() - t0

    rows = []
    for rounds in (1, 4):
        res = {}
        for name, fn in (("hf", hf), ("vllm", vl)):
            fn(rounds, 999)  # warm-up
            runs = [fn(rounds, s) for s in range(args.repeats)]
            res[name] = dict(
                tps=statistics.median(st.generated_tokens / dt for st, dt in runs),
                tokens=statistics.median(st.generated_tokens for st, _ in runs),
                cached=statistics.median(st.prefix_cached_tokens for st, _ in runs),
                inherited_cached=statistics.median(st.inherited_cached_tokens for st, _ in runs),
                inherited=statistics.median(st.inherited_tokens for st, _ in runs),
                prefill=statistics.median(st.prefill_tokens for st, _ in runs),
            )
        rows.append(
            dict(rounds=rounds, **{f"{k}_{n}": v for n, r in res.items() for k, v in r.items()})
        )
    return dict(
        model=model_name,
        params=params,
        T=T,
        prompt_len=statistics.mean(map(len, prompts)),
        engine_start_s=info["engine_start_s"],
        threads=args.threads,
        rows=rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="demo,medium")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return
    print(
        f"machine: {report.machine()}, "
        f"{args.threads} torch thread(s) for the hf engine, torch {torch.__version__}; "
        f"{args.prompts} prompts x {args.group} tracks, medians of {args.repeats}"
    )
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{name}: failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        print(
            f"\n{name}: {r['params'] / 1e6:.2f}M parameters, prompts {r['prompt_len']:.0f} "
            f"tokens, T={r['T']}, vLLM engine start {r['engine_start_s']:.1f}s"
        )
        print(
            "| rounds | hf tokens/s | vllm tokens/s | vllm / hf | tokens | vllm prefix-cached "
            "tokens | of which on newcomers | inherited tokens |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for x in r["rows"]:
            print(
                f"| {x['rounds']} | {x['tps_hf']:,.0f} | {x['tps_vllm']:,.0f} | "
                f"{x['tps_vllm'] / x['tps_hf']:.2f}x | {x['tokens_vllm']:,.0f} | "
                f"{x['cached_vllm']:,.0f} | {x['inherited_cached_vllm']:,.0f} | "
                f"{x['inherited_vllm']:,.0f} |"
            )


if __name__ == "__main__":
    main()
