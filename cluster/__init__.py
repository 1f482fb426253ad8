"""How maskpipe reaches Ray: an existing cluster when an address is given, else a local instance.

Token authentication stays on (Ray ≥ 2.59 generates a token for local clusters; remote clusters share
one through RAY_AUTH_TOKEN or ~/.ray/auth_token), and a dashboard started here listens on localhost
only. `cluster/` also holds the VM cluster-launcher and KubeRay manifests that run maskpipe.
"""

from __future__ import annotations

import os

# Clients only send the cluster's token when told that the cluster wants one.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS, which a Ray job sets for its driver); with
    neither, start a local Ray instance in this process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(dashboard_host="127.0.0.1", include_dashboard=False)


def job_client(address: str | None = None):
    """The Ray Jobs client of a cluster: `address` is its dashboard URL (http://HEAD:8265); Ray lets
    $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS override it, and with none finds a cluster started on this
    machine."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)
