"""Nothing lost, ever (#27), where a Ray cluster is involved: an address where nothing listens is one line
within seconds in every command that takes one, and a run the cluster cannot hold is refused before it is
submitted. Every case goes through the command line."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_nothing_lost import learn_recipe


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv, timeout=60):
    """`maskpipe ARGV` in a fresh process of this checkout: (exit code, stderr, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", *map(str, argv)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"maskpipe {' '.join(map(str, argv))}: no answer in {timeout} s")
    return out.returncode, out.stderr, time.monotonic() - start


@pytest.mark.parametrize("command", ["run", "run ray://", "submit", "submit http://", "resume", "tune"])
def test_an_address_where_nothing_listens_is_one_line_within_seconds(command, tmp_path):
    port = free_port()
    name, _, scheme = command.partition(" ")
    address = f"{scheme}127.0.0.1:{port}"
    config = learn_recipe(tmp_path)
    run_dir = tmp_path / "r"
    argv = {"run": ["run", config, "workers.num_workers=1", "--run-dir", run_dir],
            "submit": ["submit", config, "--run-dir", run_dir],
            "resume": ["resume", run_dir],
            "tune": ["tune", ROOT / "configs" / "tiny-tune.yaml", "--run-dir", run_dir]}[name]
    if name == "resume":  # a stopped run that was never submitted
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(config.read_text())
    code, err, seconds = cli(*argv, "--address", address)
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--address {address}: cannot reach the Ray cluster (127.0.0.1:{port}" in errors[0], err
    assert "Traceback" not in err and seconds < 30, (seconds, err[-3000:])
    if name == "submit":
        assert not run_dir.exists()
