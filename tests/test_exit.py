"""flows/cli.py's quick exit: `eqlen` ends without the interpreter's teardown, after every
atexit handler has run and with its output flushed; an error still takes the normal way."""

import os
import subprocess
import sys
import textwrap


def _python(code: str, tmp_path):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


def test_quick_exit_runs_atexit_handlers_flushes_and_keeps_the_code(tmp_path):
    p = _python(
        """
        import atexit, logging, sys
        from flows import cli
        cli.arm_quick_exit()
        # Registered later, as libraries do: each must still run before the process ends.
        atexit.register(lambda: open("atexit.txt", "w").write("ran"))
        log = logging.getLogger("t")
        log.addHandler(logging.FileHandler("log.txt"))
        log.warning("kept")
        class Held:  # freed only by the interpreter's teardown, which is skipped
            def __del__(self):
                sys.stderr.write(" torn down")
        held = Held()
        print("buffered", end="")  # no newline, stdout a pipe: still in the buffer
        sys.stderr.write("err")
        sys.exit(cli.quick_exit(3))
        """,
        tmp_path,
    )
    assert p.returncode == 3
    assert p.stdout == "buffered" and p.stderr == "err"  # flushed; no " torn down"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "kept\n"


def test_not_armed_behind_an_earlier_handler_or_when_asked(tmp_path):
    # A handler registered before ours (coverage.py writes its data file in one) would run
    # after ours, i.e. never: the quick exit stands down, and the teardown runs as usual.
    code = """
        import atexit, os, sys
        from flows import cli
        if os.environ.get("EARLY"):
            atexit.register(lambda: open("early.txt", "w").write("ran"))
        cli.arm_quick_exit()
        class Held:
            def __del__(self):
                sys.stderr.write("torn down")
        held = Held()
        sys.exit(cli.quick_exit(0))
        """
    for env in ({"EARLY": "1"}, {"EQLEN_FULL_EXIT": "1"}):
        p = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **env},
            timeout=120,
        )
        assert p.returncode == 0 and p.stderr == "torn down", (env, p.stderr)
    assert (tmp_path / "early.txt").read_text() == "ran"


def test_without_a_code_the_exit_is_python_s_own(tmp_path):
    # main raised (a bug, a Ctrl-C): the traceback and exit status are Python's
    p = _python(
        """
        import atexit
        from flows import cli
        cli.arm_quick_exit()
        atexit.register(lambda: print("teardown path"))
        raise RuntimeError("boom")
        """,
        tmp_path,
    )
    assert p.returncode == 1
    assert "RuntimeError: boom" in p.stderr and "teardown path" in p.stdout


def test_eqlen_ends_with_its_exit_code(tmp_path):
    from eqlen_testing.cli import EXE

    bad = subprocess.run(
        [str(EXE), "show", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "eqlen: error:" in bad.stderr
    ok = subprocess.run([str(EXE), "config"], capture_output=True, text=True)
    assert ok.returncode == 0 and "generate.group_size" in ok.stdout


def test_the_eqlen_process_is_armed(tmp_path):
    # main() with no argv is the console script's process: it ends without the teardown
    p = _python(
        """
        import sys
        class Held:
            def __del__(self):
                sys.stderr.write("torn down")
        held = Held()
        from flows.cli import main
        sys.argv = ["eqlen", "config"]
        sys.exit(main())
        """,
        tmp_path,
    )
    assert p.returncode == 0 and "generate.group_size" in p.stdout
    assert "torn down" not in p.stderr
