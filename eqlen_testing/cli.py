"""Running the `eqlen` console script as a user does, in a subprocess, for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = Path(sys.executable).parent / "eqlen"
# The demo at a size that runs in seconds: 4 prompts of 64, 4 tracks of at most 8 tokens.
SMALL = [
    "--set",
    "data.demo_size=64",
    "--set",
    "data.prompts_per_iteration=4",
    "--set",
    "generate.group_size=4",
    "--set",
    "generate.max_new_tokens=8",
]


def environment(env: dict | None = None, full_env: dict | None = None) -> dict:
    """os.environ with one torch thread (two commands at once on 2 cores) and `env` on top;
    or exactly `full_env` (a test that removes variables builds its own)."""
    if full_env is not None:
        return full_env
    return {**os.environ, "EQLEN_THREADS": "1", **(env or {})}


def eqlen(
    *args,
    env: dict | None = None,
    full_env: dict | None = None,
    check: bool = True,
    timeout: float = 600,
):
    """`eqlen ARGS`; with `check`, a non-zero exit fails with its stdout and stderr."""
    p = subprocess.run(
        [str(EXE), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment(env, full_env),
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"eqlen {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
        )
    return p


def eqlen_proc(*args, env: dict | None = None) -> subprocess.Popen:
    """`eqlen ARGS` started in the background, stdout and stderr piped."""
    return subprocess.Popen(
        [str(EXE), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(env),
    )
