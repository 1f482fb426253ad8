"""How maskpipe reaches Ray: an existing cluster when an address is given, else a local instance.

Token authentication stays on (Ray ≥ 2.59 generates a token for local clusters; remote clusters share
one through RAY_AUTH_TOKEN or ~/.ray/auth_token), and a dashboard started here listens on localhost
only. `cluster/` also holds the VM cluster-launcher and KubeRay manifests that run maskpipe.
"""

from __future__ import annotations

import os

from maskpipe.pipeline import MaskpipeError

# Clients only send the cluster's token when told that the cluster wants one.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def head_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `ray start --head` on this machine with token authentication on: `env` (default
    os.environ) with RAY_AUTH_MODE=token, after making sure a token exists. `ray start` refuses to start
    without one, where `ray.init` would generate it, so this runs `ray get-auth-token --generate` (which
    writes ~/.ray/auth_token only when there is no token yet)."""
    import subprocess

    env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "token"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


# How long a cluster's port may take to accept a connection before it counts as unreachable: ray.init
# and the Jobs client themselves retry for minutes, printing GCS warnings, when nothing listens.
PROBE_TIMEOUT_S = 3


def probe(address: str, flag: str = "--address") -> None:
    """Refuse, within seconds, an address where nothing accepts a TCP connection: HEAD:PORT (a bare
    HEAD is Ray's GCS port 6379), ray://HEAD:PORT (Ray Client, 10001) or http(s)://HEAD:PORT (the
    dashboard). `auto` is Ray's to find."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        return
    default = {"ray": 10001, "http": 80, "https": 443}
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port or default.get(parts.scheme, 6379)
    except ValueError as e:  # a port that is not a number
        raise MaskpipeError(f"{flag} {address}: not a Ray address ({e}): HEAD:6379, ray://HEAD:10001 or "
                            "http://HEAD:8265") from None
    if not host:
        raise MaskpipeError(f"{flag} {address}: not a Ray address: HEAD:6379, ray://HEAD:10001 or http://HEAD:8265")
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        why = (f"no answer in {PROBE_TIMEOUT_S} s" if isinstance(e, TimeoutError)
               else (e.strerror or str(e) or type(e).__name__).lower())
        raise MaskpipeError(f"{flag} {address}: cannot reach the Ray cluster ({host}:{port}: {why}); start one "
                            "with `ray start --head` or fix the address") from None


def connect(address: str | None = None, verbose: bool = False) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS, which a Ray job sets for its driver); with
    neither, start a local Ray instance in this process. Unless `verbose`, Ray's own INFO and WARNING
    lines (placement groups, reports, worker start-up) stay off the console: maskpipe's driver prints a
    line per stage, and every worker's log is in the run's `run.log`."""
    import logging

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise MaskpipeError(f"--address {address}: a dashboard URL is what `submit` takes; `run` joins the "
                            "cluster itself: HEAD:6379 or auto")
    if address:
        probe(address)
    quiet = {} if verbose else {"logging_level": logging.WARNING,
                                "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR")}
    try:
        if address:
            ray.init(address=address, log_to_driver=True, **quiet)
        else:
            ray.init(dashboard_host="127.0.0.1", include_dashboard=False, **quiet)
    except Exception as e:  # noqa: BLE001 - whatever keeps ray.init from joining, the user sees one line
        raise MaskpipeError(f"--address {address or '(local instance)'}: cannot reach the Ray cluster: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def job_client(address: str | None = None):
    """The Ray Jobs client of a cluster: `address` is its dashboard URL (http://HEAD:8265); Ray lets
    $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS override it, and with none finds a cluster started on this
    machine."""
    from ray.job_submission import JobSubmissionClient

    given = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if given:
        probe(given)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - refused, unreachable, no token, no cluster: all one answer
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "(none given)"
        raise MaskpipeError(f"--address {where}: cannot reach the Ray cluster "
                            f"({str(e).split('. ')[0].splitlines()[0] if str(e) else type(e).__name__}); start "
                            "one with `ray start --head` or give its dashboard, http://HEAD:8265") from None


def cluster_resources(client) -> dict[str, float] | None:
    """The resources of the alive nodes of the cluster behind a Jobs client (its dashboard's state API),
    as `ray.cluster_resources()` gives them to a connected driver; None if the dashboard does not say."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=client.get_address(), filters=[("state", "=", "ALIVE")], timeout=10,
                           raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - an older or restricted dashboard: the job's driver checks again
        return None
    total: dict[str, float] = {}
    for node in nodes:
        for res, n in (node.resources_total or {}).items():
            total[res] = total.get(res, 0) + n
    return total or None  # a head just started lists no node yet: unknown, not empty
