"""`eqlen export RUN_DIR OUT [--iteration I] [--force]`: a run's trained model as a clean
Hugging Face folder.

A run's policy after iteration I is the update stage's output, `<cache>/update/<key>/model/`
(`eqlen show RUN_DIR --json`: `iterations[I].stages.update.path` + `/model`). That folder is
loadable as it is, but it also holds what only training needs: the optimizer state
(`optimizer.pt`), the global step (`trainer_state.json`) and, with LoRA, the adapter
(`adapter/`; the weights beside it are already merged, base + scaled B·A). Export copies
the rest: config, generation config, weights (merged, sharded or not), the tokenizer files
and its chat template, so `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load the trained model and nothing else.

The copy is checked before it is written (the output folder's files still match its cache
manifest, config.json, weights and tokenizer present) and written to a temporary folder
beside OUT that is renamed into place, so an interrupted export leaves no half folder.
A non-empty OUT is refused unless --force; the default iteration is the last recorded update.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from flows.runner import RunError, RunRecord, stage_spec
from pipeline import cache
from pipeline.models import check_folder

# Training state in a policy folder: not part of the exported model.
TRAINING_ONLY = {"optimizer.pt", "trainer_state.json", "adapter"}


@dataclass
class Exported:
    source: str  # the policy folder copied
    path: str  # OUT
    iteration: int
    files: int
    bytes: int


def policy_folder(run_dir: str | Path, iteration: int | None = None) -> tuple[Path, int]:
    """(the model folder of iteration `iteration`'s update, that iteration); default the
    last iteration with a recorded update."""
    rec = RunRecord(run_dir)
    if not rec.path.is_file():
        raise RunError(
            f"{rec.run_dir} is not a run directory (no run.json); give the folder of an `eqlen run`"
        )
    its = rec.entries()
    updates = [i for i, st in enumerate(its) if "update" in st]
    if not updates:
        raise RunError(f"{rec.path}: no update recorded yet, so there is no trained model")
    if iteration is None:
        iteration = updates[-1]
    elif iteration not in updates:
        raise RunError(
            f"--iteration {iteration}: {rec.path} has no update at that iteration; "
            f"recorded updates: {', '.join(map(str, updates))}"
        )
    entry = Path(its[iteration]["update"]["path"])
    if cache.lookup(entry) is None:
        raise RunError(
            f"the update of iteration {iteration} ({entry}) is missing from the cache (removed "
            f"by `eqlen gc`?); recompute it with `eqlen stage update --run-dir {rec.run_dir} "
            f"--iteration {iteration}`"
        )
    if not cache.intact(entry):
        raise RunError(
            f"the update of iteration {iteration} ({entry}) was modified after it was written "
            "(its files no longer match its manifest); recompute it with `eqlen stage update "
            f"--run-dir {rec.run_dir} --iteration {iteration} --force`"
        )
    return entry / stage_spec("update").output_sub, iteration


def export(
    run_dir: str | Path, out: str | Path, *, iteration: int | None = None, force: bool = False
) -> Exported:
    src, iteration = policy_folder(run_dir, iteration)
    check_folder(src, what=f"the policy of iteration {iteration}")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file; give a folder to export to")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(
            f"{out} is not empty; give an empty or new folder, or --force to replace its contents"
        )
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise RunError(f"{out}: export to a folder outside the policy folder {src}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    n, size = 0, 0
    try:
        for p in sorted(src.iterdir()):
            if p.name in TRAINING_ONLY or p.name.startswith("."):
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copy2(p, tmp / p.name)
        for p in tmp.rglob("*"):
            if p.is_file():
                n, size = n + 1, size + p.stat().st_size
        check_folder(tmp, what="the exported folder")
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(str(src), str(out), iteration, n, size)
