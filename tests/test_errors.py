"""One clear error per user mistake: exit code 2, a few lines naming the file, line, column,
row or function and what to do, no traceback, and nothing already written changed.
(Over 500 lines: one test per row of the README's errors table, kept together.)

Most cases fail in the preflight (flows/preflight.py), before Prefect starts: those run
the real `eqlen` command with PREFECT_API_URL pointing at a closed port, so a command that
got as far as Prefect would fail differently. Errors that can only show on real rollouts
(a reward function that raises on some completion, an out-of-memory stage) run through a
real Prefect server (the `prefect_server` fixture) and must still print one message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eqlen_testing.cli import SMALL as cli_small
from eqlen_testing.cli import eqlen as run_eqlen
from flows import runner
from pipeline import config
from pipeline.errors import EqLenError

SMALL = ["--iterations", "1", *cli_small]
DEAD_API = "http://127.0.0.1:9/api"  # nothing listens: a command must fail before Prefect


def eqlen(*args, pythonpath: Path | None = None, prefect: bool = False):
    env = {} if prefect else {"PREFECT_API_URL": DEAD_API}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    return run_eqlen(*args, env=env, check=False)


def assert_clear(p, *needles: str, max_lines: int = 6) -> str:
    """Exit code 2, one short message on stderr naming every needle, no traceback."""
    err = p.stderr.strip()
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert len(err.splitlines()) <= max_lines, f"{len(err.splitlines())} lines:\n{err}"
    assert err.startswith("eqlen: error: "), err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"
    return err


@pytest.fixture
def existing_run(tmp_path):
    """A run directory left by an earlier good run: its records must survive a failing command."""
    d = tmp_path / "run"
    d.mkdir()
    cfg = config.to_dict(config.load(None, []))
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "run.json").write_text(json.dumps({"config": cfg, "iterations": []}))
    before = {
        f: ((d / f).read_bytes(), (d / f).stat().st_mtime_ns) for f in ("config.yaml", "run.json")
    }
    yield d
    after = {f: ((d / f).read_bytes(), (d / f).stat().st_mtime_ns) for f in before}
    assert after == before, "a failing command changed the run's records"
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "run.json"]


def jsonl(path: Path, *lines: str | bytes) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(data)
    return path


GOOD = '{"prompt": "rev 12=", "answer": "21"}'


# -- prompt data ------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path, existing_run):
    f = jsonl(tmp_path / "p.jsonl", GOOD, '{"prompt": "rev 3=", "answer": ', GOOD)
    p = eqlen("run", "--run-dir", existing_run, "--set", f"data.prompts={f}")
    assert_clear(p, f"{f}, line 2: not valid JSON", "one JSON object per line")


def test_empty_jsonl(tmp_path, existing_run):
    f = tmp_path / "p.jsonl"
    f.write_text("\n \n")
    p = eqlen("run", "--run-dir", existing_run, "--set", f"data.prompts={f}")
    assert_clear(p, f"{f} is empty")


def test_non_utf8_jsonl_names_the_line(tmp_path, existing_run):
    f = jsonl(tmp_path / "p.jsonl", GOOD, GOOD, b'{"prompt": "caf\xe9 12=", "answer": "21"}')
    p = eqlen("run", "--run-dir", existing_run, "--set", f"data.prompts={f}")
    assert_clear(p, f"{f}, line 3: not UTF-8", "byte 0xe9", "Save the file as UTF-8")


def test_column_of_mixed_types_names_column_and_lines(tmp_path, existing_run):
    f = jsonl(
        tmp_path / "p.jsonl",
        '{"prompt": "rev 12=", "answer": 21}',
        '{"prompt": "rev 3=", "answer": "3"}',
    )
    p = eqlen("run", "--run-dir", existing_run, "--set", f"data.prompts={f}")
    assert_clear(p, "column 'answer'", "line 1 holds a number", "line 2 holds a string")


def test_prompt_file_without_the_answer_column_a_builtin_reward_needs(tmp_path, existing_run):
    f = jsonl(tmp_path / "p.jsonl", '{"question": "rev 12=", "solution": "21"}')
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"data.prompts={f}",
        "--set",
        "data.prompt_column=question",
        "--set",
        "score.reward_funcs=[numeric_match]",
    )
    assert_clear(
        p,
        "built-in reward function 'numeric_match' needs column 'answer'",
        "columns: prompt_id, solution (from the prompt data)",
        "data.prompts",
    )


# -- model ------------------------------------------------------------------------------


def demo_model() -> Path:
    from pipeline.demo import demo_model_dir

    return demo_model_dir()


def test_model_folder_without_weights(tmp_path, existing_run):
    m = tmp_path / "model"
    shutil.copytree(demo_model(), m, ignore=shutil.ignore_patterns("*.safetensors"))
    p = eqlen("run", "--run-dir", existing_run, "--set", f"model={m}")
    assert_clear(p, f"{m} has a config.json but no weights", "model.safetensors", "save_pretrained")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (learned positions: 32 of them) with the demo tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.models import load_tokenizer

    out = tmp_path_factory.mktemp("gpt2")
    tok = load_tokenizer(demo_model())
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=32,
            n_embd=16,
            n_layer=1,
            n_head=2,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_max_new_tokens_beyond_the_models_positions(tmp_path, existing_run, gpt2_dir):
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"model={gpt2_dir}",
        "--set",
        "generate.max_new_tokens=40",
    )
    assert_clear(p, "generate.max_new_tokens=40", "n_positions=32", str(gpt2_dir / "config.json"))
    # Prompt plus response: the demo's longest prompt (13 bytes) + 24 new tokens > 32.
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"model={gpt2_dir}",
        "--set",
        "generate.max_new_tokens=24",
    )
    assert_clear(
        p,
        "generate.max_new_tokens=24",
        "more than the model's n_positions=32",
        "Lower generate.max_new_tokens to",
    )
    p = eqlen("run", "--run-dir", existing_run, "--set", "generate.max_new_tokens=64")
    assert_clear(p, "max_position_embeddings=64")


# -- run directory and cache ------------------------------------------------------------


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    p = eqlen("run", "--run-dir", f)
    assert_clear(p, f"{f} is a file, not a folder", "--run-dir")
    assert f.read_text() == "keep me"


@contextlib.contextmanager
def read_only(folder: Path):
    """folder made read-only for this process: mode bits for a normal user; as root (whom
    mode bits do not stop) a read-only tmpfs mounted over it, or skip where that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only folder: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_run_dir(tmp_path):
    with read_only(tmp_path / "ro") as ro:
        p = eqlen("run", "--run-dir", ro / "run")
        assert_clear(p, f"cannot write in {ro}", "--run-dir")
        p = eqlen("run", "--run-dir", ro)
        assert_clear(p, f"cannot write in {ro}")


def test_unwritable_cache_dir(tmp_path, existing_run):
    f = tmp_path / "cache-file"
    f.write_text("")
    p = eqlen("run", "--run-dir", existing_run, "--set", f"cache_dir={f / 'cache'}")
    assert_clear(p, "cache_dir", f"{f} is a file")
    with read_only(tmp_path / "ro") as ro:
        p = eqlen("run", "--run-dir", existing_run, "--set", f"cache_dir={ro}")
        assert_clear(p, "cache_dir", f"cannot write in {ro}")


# -- reward functions in the preflight --------------------------------------------------


@pytest.fixture
def rewards(tmp_path) -> Path:
    d = tmp_path / "mods"
    d.mkdir()
    (d / "rw.py").write_text(
        textwrap.dedent("""
        PARTIAL = 0.2

        def needs_solution(completions, **kw):
            return [float(c == s) for c, s in zip(completions, kw["solution"])]

        def one_value(completions, **kw):
            return [1.0]

        def words(completions, **kw):
            return ["good" for _ in completions]

        def by_track(completions, track_id, **kw):
            return [1.0 / (t - 5) if t < 9 else PARTIAL for t in track_id]
    """)
    )
    (d / "broken_import.py").write_text("import os\nRATE = 1 / 0\n")
    return d


def test_reward_module_typo(tmp_path, existing_run, rewards):
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        "score.reward_funcs=[rw_typo:fn]",
        pythonpath=rewards,
    )
    assert_clear(p, "'rw_typo:fn'", "cannot import module 'rw_typo'", "PYTHONPATH")
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        "score.reward_funcs=[rw:nope]",
        pythonpath=rewards,
    )
    assert_clear(p, "module 'rw' has no callable 'nope'", "needs_solution")


def test_reward_module_that_fails_to_import(tmp_path, existing_run, rewards):
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        "score.reward_funcs=[broken_import:fn]",
        pythonpath=rewards,
    )
    assert_clear(
        p, "importing module 'broken_import' failed with ZeroDivisionError", "broken_import.py:2"
    )


def test_user_reward_looking_up_a_missing_column(tmp_path, existing_run, rewards):
    f = jsonl(tmp_path / "p.jsonl", GOOD)
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"data.prompts={f}",
        "--set",
        "score.reward_funcs=[rw:needs_solution]",
        pythonpath=rewards,
    )
    assert_clear(
        p,
        "'rw:needs_solution' looks up column 'solution'",
        "columns: prompt_id, answer (from the prompt data)",
    )


def test_reward_returning_the_wrong_number_of_values(tmp_path, existing_run, rewards):
    f = jsonl(tmp_path / "p.jsonl", GOOD, GOOD.replace("12", "34"))
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"data.prompts={f}",
        "--set",
        "score.reward_funcs=[rw:one_value]",
        pythonpath=rewards,
    )
    assert_clear(p, "'rw:one_value' returned 1 values for 2 completions")


def test_reward_returning_non_numbers(tmp_path, existing_run, rewards):
    f = jsonl(tmp_path / "p.jsonl", GOOD)
    p = eqlen(
        "run",
        "--run-dir",
        existing_run,
        "--set",
        f"data.prompts={f}",
        "--set",
        "score.reward_funcs=[exact_match,rw:words]",
        pythonpath=rewards,
    )
    assert_clear(p, "'rw:words' returned str 'good' at row 0", "return a number")


# -- reward functions on real rollouts (the score stage itself) ---------------------------


def rollouts(n: int = 6) -> pa.Table:
    resp = [[5, 1]] * n
    return pa.table(
        {
            "prompt_id": [f"q{i // 2}" for i in range(n)],
            "prompt": ["rev 12="] * n,
            "iteration": [0] * n,
            "prompt_ids": [[1]] * n,
            "pair_id": [i // 2 for i in range(n)],
            "track_id": list(range(n)),
            "parent_track_id": pa.array([None] * n, pa.int64()),
            "birth_round": [0] * n,
            "own_start": [0] * n,
            "response_ids": resp,
            "logprobs": [[-0.1, -0.1]] * n,
            "finish_reason": ["eos"] * n,
            "response": ["21", "12", "21", "x", "21", "2"][:n],
            "answer": ["21"] * n,
        }
    )


def score_run(tmp_path, funcs: str):
    from stages import score

    d = tmp_path / "rollouts"
    d.mkdir(exist_ok=True)
    pq.write_table(rollouts(), d / "rollouts.parquet")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    cfg = config.load(None, [f"score.reward_funcs={funcs}"])
    score.run({"rollouts": d}, out, cfg, runner.Context(iteration=0, log=lambda m: None))
    return pq.read_table(out / "scored.parquet")


@pytest.fixture
def modules(tmp_path, monkeypatch):
    for name, body in {
        "ra": "def fn(completions, **kw):\n    return [1.0] * len(completions)\n",
        "rb": "def fn(completions, **kw):\n    return [float(c == '21') for c in completions]\n",
        "rc": textwrap.dedent("""
            def on_row(completions, track_id, **kw):
                return [float(int(c)) if t != 3 else {}["missing"] for c, t in
                        zip(completions, track_id)]
            def parse(completions, **kw):
                return [float(int(c)) for c in completions]
            def solution(completions, **kw):
                return [float(c == s) for c, s in zip(completions, kw["solution"])]
            def dict_out(completions, **kw):
                return {"score": 1.0}
            def none_out(completions, **kw):
                return None
        """),
    }.items():
        (tmp_path / f"{name}.py").write_text(body)
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("ra", "rb", "rc"):
        sys.modules.pop(name, None)


def test_two_reward_functions_with_one_name_get_distinct_columns(tmp_path, modules):
    t = score_run(tmp_path, "[exact_match,ra:fn,rb:fn]")
    assert t.column("reward_ra_fn").to_pylist() == [1.0] * 6
    assert t.column("reward_rb_fn").to_pylist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert t.column("reward_exact_match").to_pylist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert t.column("reward").to_pylist() == [3.0, 1.0, 3.0, 1.0, 3.0, 1.0]
    # Unambiguous names keep today's columns; one function listed twice is an error.
    assert "reward_fn" in score_run(tmp_path, "[ra:fn]").column_names
    from stages.score import RewardError

    with pytest.raises(RewardError, match="lists 'ra:fn' more than once"):
        score_run(tmp_path, "[ra:fn,ra:fn]")


def test_reward_that_raises_names_function_exception_and_first_failing_row(tmp_path, modules):
    from stages.score import RewardError

    with pytest.raises(RewardError) as e:
        score_run(tmp_path, "[rc:parse]")
    msg = str(e.value)
    assert "'rc:parse' raised ValueError: invalid literal for int()" in msg
    assert "at row 3 (prompt_id 'q1', track_id 3)" in msg and "completion 'x'" in msg
    assert "rc.py:" in msg
    # A KeyError that is not a missing column is reported like any other exception.
    with pytest.raises(RewardError, match=r"'rc:on_row' raised KeyError: 'missing'.* at row 3"):
        score_run(tmp_path, "[rc:on_row]")
    assert not (tmp_path / "out" / "scored.parquet").exists()


def test_reward_missing_column_on_rollouts_lists_the_columns(tmp_path, modules):
    with pytest.raises(
        EqLenError,
        match=r"'rc:solution' looks up column 'solution', missing "
        r"from the rollouts .*; columns: prompt_id, "
        r"answer \(from the prompt data\); also completions",
    ):
        score_run(tmp_path, "[rc:solution]")


@pytest.mark.parametrize(
    "func, pattern",
    [
        ("rc:dict_out", r"'rc:dict_out' returned dict \{'score': 1.0\}, not a list of 6 numbers"),
        ("rc:none_out", r"'rc:none_out' returned NoneType None, not a list of 6 numbers"),
    ],
)
def test_reward_returning_no_list(tmp_path, modules, func, pattern):
    with pytest.raises(EqLenError, match=pattern):
        score_run(tmp_path, f"[{func}]")


def test_reward_key_covers_the_whole_module(tmp_path, modules):
    """Editing a module constant or helper (not the function) changes the reward's key."""
    from stages.score import _code_digest

    src = tmp_path / "rk.py"
    src.write_text(
        "PARTIAL = 0.2\n\ndef fn(completions, **kw):\n    return [PARTIAL] * len(completions)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        before = _code_digest("rk:fn")
        src.write_text(src.read_text().replace("0.2", "0.5"))
        assert _code_digest("rk:fn") != before
        assert _code_digest("exact_match") == "builtin"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("rk", None)


def test_model_config_reading_for_other_architectures(tmp_path):
    from pipeline.models import ModelError, check_folder, max_positions

    assert max_positions({"model_type": "qwen2", "max_position_embeddings": 32768}) == (
        "max_position_embeddings",
        32768,
    )
    assert max_positions({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}) == (
        "n_positions",
        1024,
    )
    assert max_positions({"text_config": {"max_position_embeddings": 4096}}) == (
        "max_position_embeddings",
        4096,
    )
    assert max_positions({"model_type": "mamba"}) is None
    m = tmp_path / "sharded"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "tokenizer.json").write_text("{}")
    (m / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    (m / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="missing: model-00002-of-00002.safetensors"):
        check_folder(m)
    (m / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not valid JSON"):
        check_folder(m)


# -- through Prefect: errors raised inside a stage ---------------------------------------


@pytest.mark.flow
def test_reward_error_inside_the_flow_prints_one_message(prefect_server, tmp_path, rewards):
    d = tmp_path / "run"
    p = eqlen(
        "run",
        "--run-dir",
        d,
        *SMALL,
        "--set",
        "score.reward_funcs=[rw:by_track]",
        pythonpath=rewards,
        prefect=True,
    )
    err = assert_clear(
        p, "'rw:by_track' raised ZeroDivisionError", "at row 5", "track_id 5", "rw.py:", max_lines=3
    )
    assert "Task run" not in p.stderr and "Flow run" not in p.stderr, err
    assert "Task run" not in p.stdout and "Traceback" not in p.stdout


@pytest.mark.flow
def test_out_of_memory_in_a_stage_names_the_knobs(prefect_server, tmp_path, monkeypatch, capfd):
    import torch

    from flows import cli

    real = runner.run_stage

    def run_stage(name, *a, **kw):
        if name == "update":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(name, *a, **kw)

    monkeypatch.setattr(runner, "run_stage", run_stage)
    try:
        rc = cli.main(["run", "--run-dir", str(tmp_path / "run"), *SMALL])
    finally:  # send this process's run logs while the server is still up
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    err = capfd.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("eqlen: error: stage update ran out of memory"), err
    assert "OutOfMemoryError: CUDA out of memory" in err
    assert "update.micro_batch_size (now 64)" in err and "generate.max_new_tokens (now 8)" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err
