"""Check a run directory's datasets against the invariants of docs/method.md, "Invariants".

    .venv/bin/python scripts/check_run.py RUN_DIR [--iterations 0,3,9]

For every iteration recorded in RUN_DIR/run.json it opens the `scored` rollouts and the
`units` written by the pair stage, and
- runs the test suite's independent checker (eqlen_testing/invariants.py) on them: lineage and
  lock-step rules of the rounds, the budget, EOS; every unit's members equal in length
  and built from the rollouts as the strategy says;
- recomputes every recorded sampling log-prob of a track's own tokens with a plain
  transformers forward pass of the policy that sampled it (temperature applied) and
  prints the largest difference.
Either engine's output can be checked; a failed invariant stops with its message.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import pyarrow.parquet as pq
import torch

from eqlen_testing.invariants import check_rollouts, check_units
from flows import cli
from flows.runner import RunRecord
from pipeline import config
from pipeline.models import load_policy, load_tokenizer


def max_logprob_diff(model, rows: list[dict], temperature: float) -> float:
    worst = 0.0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            lp = torch.log_softmax(model(ids).logits[0].float() / temperature, -1)
            p = len(r["prompt_ids"])
            for i in range(r["own_start"], len(r["response_ids"])):
                worst = max(
                    worst, abs(lp[p - 1 + i, r["response_ids"][i]].item() - r["logprobs"][i])
                )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--iterations", help="comma-separated iteration indices (default: all)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    record, cfg_file = run_dir / "run.json", run_dir / "config.yaml"
    for f in (record, cfg_file):
        if not f.exists():
            raise SystemExit(f"{f}: not found; is {run_dir} a run directory of `eqlen run`?")
    cfg = config.load(str(cfg_file), [])
    g = cfg.generate
    if g.top_p < 1.0 or g.top_k > 0:
        print("note: top_p/top_k are set; the recomputed log-probs ignore them")
    wanted = {int(x) for x in args.iterations.split(",")} if args.iterations else None
    cli._runtime()  # HF progress bars off, torch's thread count as `eqlen run` sets it
    # Paths as RunRecord resolves them: relative to the run dir, so a moved or copied run
    # directory is checked where it is now.
    for index, st in enumerate(RunRecord(run_dir).entries()):
        if wanted is not None and index not in wanted:
            continue
        it = {"index": index}
        rollouts = pq.read_table(Path(st["score"]["path"]) / "scored.parquet").to_pylist()
        units = pq.read_table(Path(st["pair"]["path"]) / "units.parquet").to_pylist()
        policy_dir = st["generate"]["inputs"]["policy"]["path"]
        eos_id = load_tokenizer(policy_dir).eos_token_id
        try:
            check_rollouts(
                rollouts, rounds=g.rounds, max_new_tokens=g.max_new_tokens, eos_id=eos_id
            )
            # The units' own strategy: an offline rerun may have changed it since config.yaml.
            strategy = units[0]["strategy"] if units else cfg.pair.strategy
            check_units(rollouts, units, None, strategy=strategy)
        except AssertionError as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise SystemExit(
                f"iteration {it['index']}: invariant failed in {st['score']['path']}"
                f" / {st['pair']['path']}: {e or ''} (eqlen_testing/invariants.py line "
                f"{where.lineno}: {where.line})"
            ) from None
        model = load_policy(policy_dir, torch.device("cpu"))
        diff = max_logprob_diff(model, rollouts, g.temperature)
        print(
            f"iteration {it['index']}: invariants hold on {len(rollouts)} tracks and "
            f"{len(units)} unit members; max |recorded - recomputed log-prob| {diff:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
