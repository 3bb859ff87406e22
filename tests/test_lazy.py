"""pipeline/lazy.py, and what it is for: a fully cached `eqlen run` imports neither torch nor
transformers, while a run that computes still gets the thread count the CLI sets."""

import json
import os
import subprocess
import sys

SETS = [
    "iterations=1",
    "data.demo_size=64",
    "data.prompts_per_iteration=4",
    "generate.group_size=4",
]


def _python(code: str, env: dict | None = None) -> str:
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_when_loaded_runs_after_the_first_real_load_or_at_once():
    code = (
        "import json, sys\n"
        "from pipeline import lazy\n"
        "seen = []\n"
        "lazy.when_loaded('fractions', lambda m: seen.append(m.Fraction(1, 2)))\n"
        "bound = 'fractions' in sys.modules and not lazy.is_loaded('fractions')\n"
        "before = list(seen)\n"
        "import fractions\n"
        "half = fractions.Fraction(2, 4)\n"  # the first attribute use loads it
        "lazy.when_loaded('json', lambda m: seen.append('json'))\n"  # loaded: runs now
        "print(json.dumps([bound, before, str(half), [str(s) for s in seen],"
        " lazy.is_loaded('fractions')]))\n"
    )
    bound, before, half, seen, loaded = json.loads(_python(code))
    assert bound and before == [] and half == "1/2"
    assert seen == ["1/2", "json"] and loaded


def test_fully_cached_run_imports_neither_torch_nor_transformers(prefect_server, tmp_path):
    run = str(tmp_path / "run")
    args = ["run", "--run-dir", run] + [a for s in SETS for a in ("--set", s)]
    # First run: computes every stage, with the thread count `eqlen run` sets (EQLEN_THREADS)
    # applied when torch is first loaded, not at start-up.
    first = _python(
        "import json, sys\n"
        "from flows.cli import main\n"
        f"rc = main({args!r})\n"
        "import torch\n"
        "print(json.dumps([rc, torch.get_num_threads()]))\n",
        env={"EQLEN_THREADS": "1"},
    )
    assert json.loads(first) == [0, 1]
    second = _python(
        "import json, sys\n"
        "from flows.cli import main\n"
        "from pipeline import lazy\n"
        f"rc = main({args!r})\n"
        "print(json.dumps([rc, lazy.is_loaded('torch'), 'torch._C' in sys.modules,"
        " 'transformers.modeling_utils' in sys.modules]))\n"
    )
    assert json.loads(second) == [0, False, False, False]
    from flows.report import show_data

    stages = [s for it in show_data(run)["iterations"] for s in it["stages"].values()]
    assert len(stages) == 4 and all(s["cached"] for s in stages)
