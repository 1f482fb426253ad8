"""Overhead of Ray orchestration on the embedded default config, as ratios measured in one run.

    python benchmarks/ray_overhead.py [--config configs/tiny.yaml] [--out docs/ray_overhead.json]

Times, from the repository root, three ways of running the same recipe to completion, each in a fresh
process as a user types it:
  foreground   `maskpipe run CONFIG workers.num_workers=0`: every stage in one process, no Ray
  local Ray    `maskpipe run CONFIG`: a local Ray instance, the config's worker group and actors
  Ray job      `maskpipe submit CONFIG` to a running head on loopback (started before timing), polled
               until the run directory says completed
and prints a table with each time over the foreground one. Run it alone: on a 2-core machine any other
load moves the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskpipe.cluster import head_env

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--out", default=None, help="also write the timings as JSON")
    a = p.parse_args()
    env = head_env({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")})
    maskpipe = [sys.executable, "-m", "maskpipe.jobs.cli"]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        times["foreground (no Ray)"], _ = timed(maskpipe + ["run", a.config, f"output_dir={tmp}/fg",
                                                            "workers.num_workers=0"], env)
        times["local Ray instance"], _ = timed(maskpipe + ["run", a.config, f"output_dir={tmp}/local"], env)
        port, dash = free_port(), free_port()
        subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True)
        try:
            t0 = time.perf_counter()
            _, out = timed(maskpipe + ["submit", a.config, f"output_dir={tmp}/job", "--address",
                                       f"http://127.0.0.1:{dash}"], env)
            status = Path(re.search(r"run directory: (.+)", out).group(1)) / "status.json"
            while not status.exists() or json.loads(status.read_text())["status"] == "running":
                time.sleep(0.2)
            times["Ray job on a running head"] = time.perf_counter() - t0
            assert json.loads(status.read_text())["status"] == "completed", status.read_text()
        finally:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    base = times["foreground (no Ray)"]
    print(f"| {a.config} | wall time (s) | vs foreground |\n| --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
