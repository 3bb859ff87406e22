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
        "unloaded = 'fractions' not in sys.modules and not lazy.is_loaded('fractions')\n"
        "before = list(seen)\n"
        "import fractions\n"  # anyone's import runs the callback, once
        "after_import = [str(s) for s in seen]\n"
        "import importlib; importlib.reload(fractions)\n"
        "own_loader = type(fractions.__loader__).__name__\n"
        "lazy.when_loaded('json', lambda m: seen.append('json'))\n"  # loaded: runs now
        "print(json.dumps([unloaded, before, after_import, [str(s) for s in seen],"
        " lazy.is_loaded('fractions'), own_loader]))\n"
    )
    unloaded, before, after_import, seen, loaded, own_loader = json.loads(_python(code))
    assert unloaded and before == [] and after_import == ["1/2"]
    assert seen == ["1/2", "json"] and loaded
    assert own_loader == "SourceFileLoader"  # the hook leaves the module its own loader


def test_a_lazy_module_imports_on_first_use_and_is_shared():
    code = (
        "import json, pickle, sys\n"
        "from pipeline import lazy\n"
        "fr = lazy.lazy_import('fractions')\n"
        "before = 'fractions' in sys.modules\n"
        "half = str(fr.Fraction(1, 2))\n"
        "import fractions\n"
        "same = fr.Fraction is fractions.Fraction and lazy.lazy_import('fractions') is fractions\n"
        "back = pickle.loads(pickle.dumps(lazy._Deferred('fractions')))\n"
        "try:\n"
        "    lazy.lazy_import('no_such_module_x')\n"
        "    missing = 'no error'\n"
        "except ModuleNotFoundError as e:\n"
        "    missing = e.name\n"
        "print(json.dumps([before, half, same, back is fractions, missing]))\n"
    )
    assert json.loads(_python(code)) == [False, "1/2", True, True, "no_such_module_x"]


def test_a_submodule_import_after_a_lazy_binding_gets_one_copy_of_each_module():
    # The failure that importlib.util.LazyLoader gave: a package bound lazily, then first
    # reached by importing one of its submodules, was loaded and that submodule imported a
    # second time (json.decoder twice; torch.utils without _pytree, so transformers' model
    # classes failed to import after `from torch.utils.tensorboard import SummaryWriter`).
    code = (
        "import json as _j, sys\n"
        "for m in [m for m in sys.modules if m == 'json' or m.startswith('json.')]:\n"
        "    del sys.modules[m]\n"
        "from pipeline import lazy\n"
        "j = lazy.lazy_import('json')\n"
        "import json.decoder\n"
        "ok_json = j.JSONDecoder is sys.modules['json.decoder'].JSONDecoder\n"
        "t = lazy.lazy_import('torch')\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from transformers import AutoTokenizer, LlamaForCausalLM\n"
        "print(_j.dumps([ok_json, t.utils._pytree.__name__, LlamaForCausalLM.__name__]))\n"
    )
    assert json.loads(_python(code)) == [True, "torch.utils._pytree", "LlamaForCausalLM"]


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
