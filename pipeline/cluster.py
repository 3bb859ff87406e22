"""The Ray cluster a run's workers live on (`cluster.ray_address`), and where they are.

    ""                 no Ray: every stage runs in this process (the default)
    "local"            a Ray instance started for this process on 127.0.0.1, sized to the
                       machine (its CPUs, GPUs), dashboard off, Ray's token authentication
                       left on; `shutdown()` (the run's end) stops it
    "auto", "ray://…"  join an existing cluster: the user's explicit choice of address

`connect(address, cpus)` is idempotent within a process: the first call starts or joins,
later ones reuse it (the online loop calls it once per stage). Actors are kept by
`stages/workers.py` in pools that live until the run ends (the runner closes them, then
calls `shutdown()`), so an engine starts once per run, not once per iteration.

Every node must see `cache_dir` and the run directory at the same paths (a shared
filesystem): workers read their inputs and write their outputs there. `check_paths` asks
each worker whether it sees a path and fails early, naming the worker and node, when one
does not.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.errors import EqLenError


class ClusterError(EqLenError, RuntimeError):
    """Ray cannot be started or joined, or a worker cannot do its part; says what to do."""


_STATE: dict[str, Any] = {"address": None, "started": False}


def connect(address: str, cpus: int = 0) -> None:
    """Start or join the cluster of `address` once per process (see the module docstring);
    `cpus`: logical CPUs a local instance offers (at least the machine's), so that every
    worker of the run can hold one."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "cluster.ray_address is set but Ray is not installed: pip install -e '.[ray]'"
        ) from None
    if ray.is_initialized():
        if _STATE["address"] not in (None, address):
            raise ClusterError(
                f"this process is already on the Ray cluster {_STATE['address']!r}; one run "
                f"cannot also join {address!r}"
            )
        return
    # Keep Ray's own log lines and the driver's stdout forwarding quiet: eqlen prints where
    # each worker runs itself.
    kw: dict[str, Any] = dict(log_to_driver=False, logging_level="ERROR")
    try:
        if address == "local":
            _loopback_only(ray)
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, cpus),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **kw,
            )
            _STATE["started"] = True
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(
            f"cluster.ray_address={address!r}: could not "
            f"{'start a local Ray instance' if address == 'local' else 'join the cluster'} "
            f"({type(e).__name__}: {e}). Start one with `ray start --head`, check the "
            "address, or use cluster.ray_address=local."
        ) from None
    _STATE["address"] = address


def _loopback_only(ray) -> None:
    """Make a local instance bind to 127.0.0.1. Ray turns a loopback `_node_ip_address`
    into the machine's routable address on Linux, unless its own switch for single-machine
    clusters is off (ray_constants.ENABLE_RAY_CLUSTER, read from this variable when Ray is
    imported): set both, the variable for the processes Ray spawns."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # Token authentication: Ray turns it on for a new local instance (writing
    # ~/.ray/auth_token) unless RAY_AUTH_MODE says otherwise; nothing here switches it off.


def shutdown() -> None:
    """Leave the cluster: a local instance stops, a joined cluster stays up. The runner
    ends the worker pools (stages/workers.py `close_pools`) first."""
    if _STATE["address"] is None:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _STATE.update(address=None, started=False)


def node_info() -> dict:
    """Where this process runs: host, node IP, pid and the device it would use."""
    import socket

    info = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_ip"] = ray.util.get_node_ip_address()
            info["node_id"] = ctx.get_node_id()[:12]
            info["gpus"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info
