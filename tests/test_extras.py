"""Optional dependencies: deepspeed and matplotlib are extras, imported only where they are used."""

import subprocess
import sys

from tests.conftest import CORPORA, FIXTURES, MICRO, ROOT

MAGNITUDE = FIXTURES / "artifacts" / "micro-llama-magnitude-2of4-v1"

# A Python without deepspeed and matplotlib: importing either raises ImportError, and
# importlib.util.find_spec says it is not installed.
SCRIPT = """
import sys
sys.modules["deepspeed"] = None
sys.modules["matplotlib"] = None
from maskpipe.jobs.cli import main

model = ["--model", {micro!r}, "--dtype", "float32", "--device", "cpu"]
assert main(["apply", *model, "--masks", {art!r}, "--out", {out!r} + "/sparse"]) == 0
assert main(["eval", *model, "--masks", {art!r}, "--data", {data!r}, "--seqlen", "64",
             "--out", {out!r} + "/r.json"]) == 0
assert main(["export", "maskllm", {art!r}, "--out", {out!r} + "/m.npz"]) == 0
assert main(["import", "maskllm", {out!r} + "/m.npz", *model, "--out", {out!r} + "/back"]) == 0
assert main(["retrieval", *model, "--passkey", "96", "--samples", "2", "--out", {out!r} + "/ret"]) == 0
assert sys.modules["deepspeed"] is None and sys.modules["matplotlib"] is None  # never imported
# the features that need them: one line each, exit 2, before any model work
assert main(["validate", "configs/tiny.yaml", "workers.strategy=deepspeed", "workers.num_workers=2"]) == 2
assert main(["retrieval", *model, "--niah", "96", "--data", {data!r}, "--out", {out!r} + "/niah"]) == 2
print("ok")
"""


def test_eval_import_apply_export_and_passkey_run_without_deepspeed_or_matplotlib(tmp_path):
    script = SCRIPT.format(micro=str(MICRO), art=str(MAGNITUDE), data=str(CORPORA / "kjv.valid.txt"), out=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: workers.strategy: deepspeed: the deepspeed package is not installed (pip install 'maskpipe[deepspeed]')",
        "error: --niah: the NIAH heatmap needs matplotlib, which is not installed (pip install 'maskpipe[plots]')"]
    assert not (tmp_path / "niah").exists()
