"""The Prefect API server that `eqlen run` uses when none is configured.

(Over 500 lines: one lifecycle - start, reuse, health, idle stop, kill-with-run, stop - that
reads best in one place.)

With no `PREFECT_API_URL` (environment, Prefect profile or prefect.toml), Prefect 3.7.7 would
start a temporary server in every process (`SubprocessASGIServer`: 4-11 s per run on 2
cores) and leave it running forever when the run is SIGKILLed (it is stopped by `atexit`
only). Instead `eqlen run` uses one of its own, on 127.0.0.1 only:

- `keep` (the default, `EQLEN_PREFECT_SERVER=keep`): one server per `PREFECT_HOME`, started
  by the first `eqlen run` (or `eqlen server start`) in its own session, reused by every
  later run, concurrent ones included, and stopped by `eqlen server stop` or after
  `EQLEN_SERVER_IDLE_MINUTES` (default 60; 0 = never) with no request and no open
  connection. It is recorded in `PREFECT_HOME/eqlen-server.json` (pid, port, url, Prefect
  version); its log is `PREFECT_HOME/eqlen-server.log`. A file lock
  (`eqlen-server.lock`) makes concurrent runs start at most one; a recorded server that is
  dead, not ours (pid reused), of another Prefect version or not answering past its
  start-up time is replaced.
- `run` (`EQLEN_PREFECT_SERVER=run`): a server for this run only, which dies with it even
  when the run is SIGKILLed (Linux `PR_SET_PDEATHSIG`, set in the server process, plus a
  parent check that closes the race) and is stopped at a normal exit.

A configured `PREFECT_API_URL` always wins: nothing is started then. The server is one
process (uvicorn serving Prefect's `create_app` in-process, services and UI included;
it starts no children), so nothing of it can be orphaned below it.

    python -m flows.server serve --fd N --home DIR [--idle-minutes M] [--die-with PID]

is the server process itself (started by `ensure`/`for_run`, not by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import EqLenError

STATE = "eqlen-server.json"
LOCK = "eqlen-server.lock"
LOG = "eqlen-server.log"
MODES = ("keep", "run")
DEFAULT_IDLE_MINUTES = 60.0


class ServerError(EqLenError, RuntimeError):
    """The server could not be started or reached; the message says what to do."""


# ------------------------------------------------------------------ where and what


def home() -> Path:
    """The folder of the server's database and state: PREFECT_HOME (default ~/.prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve()


def prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


@dataclass
class ServerInfo:
    pid: int
    port: int
    url: str  # the API URL, http://127.0.0.1:PORT/api
    home: str
    prefect: str
    started: float  # epoch seconds
    idle_minutes: float
    mode: str = "keep"

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def describe(self) -> str:
        return (
            f"pid {self.pid}, API {self.url}, UI {self.ui}, PREFECT_HOME {self.home}, "
            f"up {_age(time.time() - self.started)}, stops after "
            + (f"{self.idle_minutes:g} min idle" if self.idle_minutes else "never (no idle stop)")
        )


def _age(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def read_state(d: Path | None = None) -> ServerInfo | None:
    p = (d or home()) / STATE
    try:
        return ServerInfo(**json.loads(p.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_state(info: ServerInfo, d: Path) -> None:
    tmp = d / f".{STATE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, d / STATE)


def _remove_state(d: Path, pid: int) -> None:
    """Remove the state file if it still records `pid`."""
    info = read_state(d)
    if info is not None and info.pid == pid:
        with contextlib.suppress(OSError):
            (d / STATE).unlink()


@contextlib.contextmanager
def _locked(d: Path):
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if we are killed
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_server(cmd: list[str], d: Path) -> bool:
    return (
        "flows.server" in cmd
        and "serve" in cmd
        and "--home" in cmd
        and cmd.index("--home") + 1 < len(cmd)
        and cmd[cmd.index("--home") + 1] == str(d)
    )


def _ours(pid: int, d: Path) -> bool:
    """`pid` is alive and is an eqlen server for `d` (not a reused pid)."""
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        return _is_server(_cmdline(pid), d)
    try:  # no /proc: trust the pid
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _private_to_live_run(cmd: list[str]) -> bool:
    """A per-run server (`--die-with PID`, EQLEN_PREFECT_SERVER=run) whose run is alive: not
    the kept server's to stop; it dies with its run."""
    if "--die-with" not in cmd or cmd.index("--die-with") + 1 >= len(cmd):
        return False
    try:
        os.kill(int(cmd[cmd.index("--die-with") + 1]), 0)
        return True
    except (ValueError, OSError):
        return False


def _servers_of(d: Path) -> list[int]:
    """Every eqlen server process for `d`, recorded or not (an interrupted start), except
    the private servers of runs still going."""
    found = {}
    for p in Path("/proc").glob("[0-9]*"):
        pid = int(p.name)
        cmd = _cmdline(pid)
        if pid != os.getpid() and _is_server(cmd, d) and not _private_to_live_run(cmd):
            found[pid] = _ppid(pid)
    # A server's child between fork and exec still shows the server's command line (the
    # server runs `file -b python` at start-up, through platform.architecture): not a server.
    return [pid for pid, ppid in found.items() if ppid not in found]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with _NO_PROXY.open(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _terminate(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _alive(pid) and time.time() < deadline + 5:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        # A zombie child of ours counts as gone; reap it if it is ours.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


# ------------------------------------------------------------------ starting


def _listen(port: int) -> socket.socket:
    """Bind 127.0.0.1:port (0 = a free port) here, so the port is known before the server
    process starts and no other process can take it in between."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        s.close()
        raise ServerError(
            f"cannot listen on 127.0.0.1:{port} ({e}); choose another port "
            "with --port, or 0 for a free one"
        ) from e
    s.listen(128)
    return s


def _server_env(d: Path, port: int) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("PREFECT_API_URL", "PREFECT__SERVER_EPHEMERAL", "PREFECT__SERVER_WEBSERVER_ONLY")
    }
    env["PREFECT_HOME"] = str(d)
    # The UI finds its API from these (unless PREFECT_UI_API_URL is set).
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return env


def _spawn(
    d: Path, port: int, idle_minutes: float, die_with: int | None
) -> tuple[subprocess.Popen, ServerInfo]:
    d.mkdir(parents=True, exist_ok=True)
    version = prefect_version()  # before the spawn: the state is written right after it
    sock = _listen(port)
    port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "flows.server",
        "serve",
        "--fd",
        str(sock.fileno()),
        "--home",
        str(d),
        "--idle-minutes",
        f"{idle_minutes:g}",
    ]
    if die_with is not None:
        cmd += ["--die-with", str(die_with)]
    try:
        with open(d / LOG, "ab") as log:
            # Own session: a Ctrl-C in the terminal of the run that started it does not
            # reach a server that other runs share.
            proc = subprocess.Popen(
                cmd,
                env=_server_env(d, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),),
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parents[1]),
            )
    finally:
        sock.close()
    info = ServerInfo(
        pid=proc.pid,
        port=port,
        url=f"http://127.0.0.1:{port}/api",
        home=str(d),
        prefect=version,
        started=time.time(),
        idle_minutes=0.0 if die_with is not None else idle_minutes,
        mode="run" if die_with is not None else "keep",
    )
    return proc, info


def _startup_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 90)


def _idle_default() -> float:
    v = os.environ.get("EQLEN_SERVER_IDLE_MINUTES")
    try:
        return float(v) if v else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ServerError(
            f"EQLEN_SERVER_IDLE_MINUTES={v!r} is not a number of minutes (0 = never stop)"
        ) from None


@dataclass
class Handle:
    """A server that is starting or running; `wait()` returns once it answers."""

    info: ServerInfo
    started_now: bool
    proc: subprocess.Popen | None = None

    def wait(self, timeout: float | None = None) -> ServerInfo:
        timeout = _startup_timeout() if timeout is None else timeout
        deadline = time.time() + timeout
        while True:
            if healthy(self.info.url, timeout=2.0):
                return self.info
            gone = (self.proc.poll() is not None) if self.proc else not _alive(self.info.pid)
            if gone or time.time() > deadline:
                tail = ""
                with contextlib.suppress(OSError):
                    tail = (Path(self.info.home) / LOG).read_text(errors="replace")[-2000:]
                what = "exited" if gone else f"did not answer within {timeout:.0f} s"
                if not gone:
                    _terminate(self.info.pid)
                    _remove_state(Path(self.info.home), self.info.pid)
                raise ServerError(
                    f"the Prefect server for eqlen (pid {self.info.pid}, {self.info.url}) {what}; "
                    f"log {Path(self.info.home) / LOG}:\n{tail}\nSet PREFECT_API_URL to a "
                    "server of your own, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                    "on a slow machine."
                )
            time.sleep(0.1)


def ensure(d: Path | None = None, port: int = 0, idle_minutes: float | None = None) -> Handle:
    """The kept server of `d` (PREFECT_HOME): reused if it runs, started if not."""
    d = d or home()
    idle = _idle_default() if idle_minutes is None else idle_minutes
    with _locked(d):
        info = read_state(d)
        if info is not None and _ours(info.pid, d):
            if info.prefect == prefect_version():
                if port not in (0, info.port):
                    raise ServerError(
                        f"eqlen's server already runs on port {info.port} "
                        f"(pid {info.pid}); `eqlen server stop` first to move it"
                    )
                if healthy(info.url, timeout=2.0):
                    return Handle(info, started_now=False)
                if time.time() - info.started < _startup_timeout():
                    return Handle(info, started_now=False)  # still starting (another run)
            _terminate(info.pid)  # another Prefect version, or hung
        for pid in _servers_of(d):  # an unrecorded one (start interrupted): never two
            _terminate(pid)
        with contextlib.suppress(OSError):
            (d / STATE).unlink()
        proc, info = _spawn(d, port, idle, die_with=None)
        _write_state(info, d)
        return Handle(info, started_now=True, proc=proc)


def start_for_this_run(d: Path | None = None) -> Handle:
    """A server that lives only as long as this process (even if it is SIGKILLed)."""
    import atexit

    d = d or home()
    proc, info = _spawn(d, 0, 0.0, die_with=os.getpid())

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    atexit.register(stop)
    return Handle(info, started_now=True, proc=proc)


def stop(d: Path | None = None) -> list[int]:
    """Stop the kept server of `d` and any unrecorded one; returns the pids stopped."""
    d = d or home()
    if not d.is_dir():
        return []
    with _locked(d):
        pids = set(_servers_of(d)) if Path("/proc").is_dir() else set()
        info = read_state(d)
        if info is not None and _ours(info.pid, d):
            pids.add(info.pid)
        for pid in pids:
            _terminate(pid)
        with contextlib.suppress(OSError):
            (d / STATE).unlink()
    return sorted(pids)


def status(d: Path | None = None) -> tuple[ServerInfo | None, bool]:
    """(recorded server if its process is alive, whether it answers)."""
    d = d or home()
    info = read_state(d)
    if info is None or not _ours(info.pid, d):
        return None, False
    return info, healthy(info.url)


def unrecorded(d: Path | None = None) -> list[int]:
    """Server processes for `d` that the state file does not name (a start interrupted
    between spawn and record); `stop` and the next `ensure` end them."""
    d = d or home()
    info = read_state(d)
    return (
        [p for p in _servers_of(d) if info is None or p != info.pid]
        if Path("/proc").is_dir()
        else []
    )


# ------------------------------------------------------------------ for `eqlen run`


def configured_api_url() -> str | None:
    """The API URL the user configured: environment, active Prefect profile, prefect.toml."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def mode() -> str:
    m = os.environ.get("EQLEN_PREFECT_SERVER", "keep").strip().lower() or "keep"
    if m not in MODES:
        raise ServerError(f"EQLEN_PREFECT_SERVER={m!r}: valid values: {', '.join(MODES)}")
    return m


class ForRun:
    """What `eqlen run` talks to. Call `begin()` before the heavy imports (the server starts
    meanwhile), `ready()` before the flow; run the flow inside `settings()`."""

    def __init__(self):
        self.handle: Handle | None = None
        self.user_url: str | None = None

    def begin(self) -> ForRun:
        self.user_url = configured_api_url()
        if self.user_url:
            return self
        self.handle = ensure() if mode() == "keep" else start_for_this_run()
        # Before Prefect reads its settings for the flow: every thread and client of this
        # process then talks to our server, and Prefect never starts a temporary one.
        os.environ["PREFECT_API_URL"] = self.handle.info.url
        import prefect.context

        prefect.context.refresh_global_settings_context()
        return self

    def ready(self) -> str:
        """Wait for the server; returns a line for the user."""
        if self.handle is None:
            return f"Prefect API: {self.user_url} (PREFECT_API_URL)"
        info = self.handle.wait()
        if info.mode == "run":
            return f"Prefect API: {info.url} (a server for this run only)"
        how = "started" if self.handle.started_now else "reused"
        return (
            f"Prefect API: {info.url} ({how} eqlen's kept server, pid {info.pid}, UI "
            f"{info.ui}; `eqlen server stop` stops it)"
        )

    @contextlib.contextmanager
    def settings(self):
        """Prefect settings for the flow: no flow-run heartbeat thread unless the user set
        one (joining it costs up to 1 s at the end of every flow run, and nothing here
        watches heartbeats)."""
        from prefect.settings import (
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            temporary_settings,
        )

        with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


# ------------------------------------------------------------------ the server process


class _Activity:
    """ASGI wrapper that counts open requests/connections and the time of the last one."""

    def __init__(self, app):
        self.app = app
        self.open = 0
        self.last = time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.open += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()


def _die_with(parent: int) -> bool:
    """SIGKILL this process when `parent` dies (Linux prctl); exit now if it already has
    (it may have died before the prctl call). False where prctl is not available."""
    ok = False
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ok = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(0)
    return ok


def serve(fd: int, d: Path, idle_minutes: float, die_with: int | None) -> None:
    if die_with is not None and not _die_with(die_with):
        import threading

        def watch_parent() -> None:  # where prctl is missing (not Linux)
            while True:
                if os.getppid() != die_with:
                    os._exit(0)
                time.sleep(1)

        threading.Thread(target=watch_parent, daemon=True).start()
    sock = socket.socket(fileno=fd)
    import uvicorn
    from prefect.server.api.server import create_app

    app = _Activity(create_app(final=True))
    level = os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING").lower()
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level=level, timeout_graceful_shutdown=5)
    )
    if idle_minutes > 0:
        import threading

        def idle_stop() -> None:
            while not server.started and not server.should_exit:  # idle counts from serving
                time.sleep(0.1)
            app.last = time.monotonic()
            while not server.should_exit:
                time.sleep(min(30.0, idle_minutes * 60 / 4))
                if app.open == 0 and time.monotonic() - app.last > idle_minutes * 60:
                    print(f"eqlen server: {idle_minutes:g} min idle, stopping", flush=True)
                    server.should_exit = True

        threading.Thread(target=idle_stop, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        _remove_state(d, os.getpid())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--fd", type=int, required=True)
    s.add_argument("--home", required=True)
    s.add_argument("--idle-minutes", type=float, default=0.0)
    s.add_argument("--die-with", type=int)
    a = ap.parse_args(argv)
    serve(a.fd, Path(a.home), a.idle_minutes, a.die_with)


if __name__ == "__main__":
    main()
