"""Nothing lost, ever (#27): two writers of one output never both succeed, publish never writes over a
run's artifacts nor copies a damaged artifact, a damaged checkpoint is never resumed, and resuming one
checkpoint gives the same logits every time. Every case goes through the command line (damaged inputs:
tests/test_damaged_inputs.py)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from maskpipe.jobs.cli import main
from maskpipe.pipeline.io.artifacts import LOGITS_FILE, MANIFEST_FILE, MASKS_FILE, save_artifact
from tests.conftest import CORPORA, MODEL_FLAGS, ROOT, cli_fails

WANDA = ["--method", "wanda", "--data", str(CORPORA / "kjv.train.txt"), "--n-samples", "2", "--seqlen", "32"]

# A `maskpipe oneshot` that, once it holds its output, says so (a file) and waits for the test's word.
PAUSED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import maskpipe.jobs.quick as quick
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    real = quick._one_stage
    def paused(*args, **kwargs):
        ready.touch()
        while not go.exists():
            time.sleep(0.05)
        return real(*args, **kwargs)
    quick._one_stage = paused
    from maskpipe.jobs.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def test_a_second_oneshot_into_the_same_out_while_the_first_writes_is_refused_and_the_first_wins(tmp_path, capsys):
    out, ready, go = tmp_path / "mask", tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(ready), str(go), "oneshot", *MODEL_FLAGS,
                              "--method", "magnitude", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        err = cli_fails(["oneshot", *MODEL_FLAGS, *WANDA, "--out", str(out)], capsys,
                        f"{out}: output path in use by pid {first.pid}", one_line=True)
        assert "Traceback" not in err
    finally:
        go.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    assert json.loads((out / MANIFEST_FILE).read_text())["method"]["name"] == "magnitude"
    # Once the first is done, the path is free again (its earlier output rules still apply).
    assert main(["oneshot", *MODEL_FLAGS, "--method", "magnitude", "--out", str(out)]) == 0


# ------------------------------------------------------------------------------------------- publish

FIXTURE = ROOT / "tests" / "fixtures" / "artifacts" / "micro-llama-magnitude-2of4-v1"


@pytest.fixture()
def run_with_artifact(tmp_path):
    """A run directory r1 with an artifact of its stage sparsegpt (by the layout: config.yaml, artifacts/)."""
    import shutil

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: r1\n")
    shutil.copytree(FIXTURE, run / "artifacts" / "sparsegpt")
    return run


def tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["artifacts/sparsegpt", "artifacts/new", "artifacts/sparsegpt/inner"])
def test_publish_refuses_an_out_inside_a_runs_artifacts_and_changes_nothing(where, run_with_artifact, capsys):
    before = tree(run_with_artifact)
    cli_fails(["publish", str(FIXTURE), "--out", str(run_with_artifact / where)], capsys,
              "inside the artifacts of run", one_line=True)
    assert tree(run_with_artifact) == before


def test_publish_refuses_to_replace_an_artifact_it_did_not_make(tmp_path, capsys):
    import shutil

    theirs = shutil.copytree(FIXTURE, tmp_path / "theirs")
    before = tree(theirs)
    cli_fails(["publish", str(FIXTURE), "--out", str(theirs)], capsys, "is not an earlier `maskpipe publish` folder",
              one_line=True)
    assert tree(theirs) == before
    # an earlier publish is replaced
    assert main(["publish", str(FIXTURE), "--out", str(tmp_path / "pub")]) == 0
    assert main(["publish", str(FIXTURE), "--out", str(tmp_path / "pub")]) == 0


def soft_artifact(path):
    from torch import nn

    from maskpipe.pipeline.nm.sparsity import nm_mask

    torch.manual_seed(0)
    linears = {"layer": nn.Linear(16, 8)}
    masks = {"layer": nm_mask(torch.rand(8, 16), 2, 4)}
    return save_artifact(path, masks, linears, base_model={"name_or_path": "x"}, pattern="2:4",
                         method={"name": "maskllm"}, soft_logits={"layer": torch.randn(8, 4, 6)})


def cut(path):
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 40])


@pytest.mark.parametrize("damage,message", [
    (lambda a: cut(a / MASKS_FILE), "masks.safetensors"),
    (lambda a: cut(a / LOGITS_FILE), "logits.safetensors: unreadable"),
    (lambda a: __import__("safetensors.torch").torch.save_file({"layer": torch.zeros(8, 4, 5)}, str(a / LOGITS_FILE)),
     "logits of shape [8, 4, 5] where the manifest implies [8, 4, 6]"),
    (lambda a: __import__("safetensors.torch").torch.save_file({"other": torch.zeros(8, 4, 6)}, str(a / LOGITS_FILE)),
     "logits for other layers"),
], ids=["truncated masks", "truncated logits", "logits of another shape", "logits of other layers"])
def test_publish_verifies_what_it_copies_and_writes_nothing_from_a_damaged_artifact(damage, message, tmp_path, capsys):
    artifact = soft_artifact(tmp_path / "art")
    assert main(["publish", str(artifact), "--out", str(tmp_path / "ok")]) == 0
    damage(artifact)
    cli_fails(["publish", str(artifact), "--out", str(tmp_path / "pub")], capsys, message, tmp_path / "pub",
              one_line=True)


@pytest.mark.parametrize("how", ["the base model it names", "--model"])
def test_publish_checks_the_fingerprint_against_the_model_at_hand_and_writes_nothing_on_a_mismatch(how, tmp_path,
                                                                                                   capsys):
    import shutil

    from tests.conftest import MICRO

    artifact = shutil.copytree(FIXTURE, tmp_path / "art")
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64  # made for some other model
    manifest["base_model"]["name_or_path"] = str(MICRO) if how != "--model" else "org/not-here"
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = ["--model", str(MICRO)] if how == "--model" else []
    cli_fails(["publish", str(artifact), "--out", str(tmp_path / "pub"), *model], capsys,
              "base model fingerprint mismatch", tmp_path / "pub", one_line=True)
    # an intact artifact checks out against its model; with no model at hand, publish says it did not check
    assert main(["publish", str(FIXTURE), "--out", str(tmp_path / "ok"), "--model", str(MICRO)]) == 0
    capsys.readouterr()
    assert main(["publish", str(artifact), "--out", str(tmp_path / "unchecked")]) == (0 if model else 2)
    if model:
        assert "fingerprint was not checked" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- checkpoints


def learn_recipe(tmp_path, steps=6):
    import yaml

    from tests.conftest import MICRO

    raw = {"name": "ck", "seed": 0, "output_dir": str(tmp_path / "runs"),
           "model": {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"},
           "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt")]}},
           "stages": [{"stage": "oneshot", "method": "magnitude"},
                      {"stage": "learn", "name": "maskllm", "data": "calib", "prior": {"stage": "magnitude"},
                       "steps": steps, "batch_size": 2, "seqlen": 32, "log_every": 1, "checkpoint_every": 2}],
           "workers": {"num_workers": 0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def die_after_step(monkeypatch, last: int) -> None:
    """The learning stage is interrupted when it logs step `last` + 1 (after the checkpoint of `last`)."""
    from maskpipe.pipeline.io.loggers import MetricsLog

    real = MetricsLog.__call__

    def log(metrics, entry):
        real(metrics, entry)
        if entry.get("step") == last + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "__call__", log)


@pytest.fixture(scope="module")
def died_run(tmp_path_factory):
    """A run interrupted at step 5 of its learning stage: checkpoints at steps 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("died")
    config, run_dir = learn_recipe(tmp_path), tmp_path / "r"
    with pytest.MonkeyPatch.context() as m:
        die_after_step(m, 4)
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 130
    return config, run_dir


@pytest.mark.parametrize("damage", ["flipped byte", "truncated shard", "missing shard", "garbage state.json"])
def test_a_damaged_latest_checkpoint_is_refused_naming_it_and_the_previous_one(damage, died_run, tmp_path, capsys):
    import shutil

    config, run_dir = died_run[0], shutil.copytree(died_run[1], tmp_path / "r")
    ckpts = run_dir / "checkpoints" / "maskllm"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000002", "step-00000004"]
    shard = ckpts / "step-00000004" / "shard-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    if damage == "flipped byte":
        blob[-3] ^= 0x10
        shard.write_bytes(bytes(blob))
    elif damage == "truncated shard":
        shard.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "missing shard":
        shard.unlink()
    else:
        (ckpts / "step-00000004" / "state.json").write_text('{"step": 4, "sh')
    what = "unreadable checkpoint" if damage == "garbage state.json" else "damaged checkpoint"
    err = cli_fails(["run", str(config), "--run-dir", str(run_dir)], capsys, f"{ckpts / 'step-00000004'}: {what}",
                    one_line=True)
    assert "delete it to resume from step 2" in err
    if damage == "missing shard":  # as it says: without the damaged one, the run resumes from step 2 and ends
        shutil.rmtree(ckpts / "step-00000004")
        assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
        assert json.loads((run_dir / "results.json").read_text())["done"] == ["magnitude", "maskllm"]


# ------------------------------------------------------------------------------------ bit-identical resume


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_resuming_one_checkpoint_several_times_gives_bit_identical_logits(threads, died_run, tmp_path):
    import hashlib
    import os
    import shutil

    config, run_dir = died_run
    digests = set()
    for i in range(3):
        copy = shutil.copytree(run_dir, tmp_path / f"r{i}")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", "run", str(config), "--run-dir", str(copy)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(hashlib.sha256((copy / "artifacts" / "maskllm" / LOGITS_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1, digests


def test_a_resume_in_a_process_of_another_thread_count_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """CPU kernels split reductions by thread count (micro-llama, 30 steps of 4 x 64 tokens on 1 and on 2
    threads: 99% of the logits differ, by up to 4e-4): a resume computes on the count its checkpoint records.
    (8 steps are too few to show a difference here, so the log line says which count the resume used.)"""
    import os

    import yaml

    raw = yaml.safe_load(learn_recipe(tmp_path, steps=8).read_text())
    raw["stages"][1].update(batch_size=4, seqlen=64)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--run-dir", str(tmp_path / "whole")]) == 0  # this process's thread count
    with monkeypatch.context() as m:
        die_after_step(m, 4)
        assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 130
    other = 1 if torch.get_num_threads() != 1 else 2
    env = {**os.environ, "OMP_NUM_THREADS": str(other), "MKL_NUM_THREADS": str(other)}
    done = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", "run", str(config), "--run-dir",
                           str(tmp_path / "r")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    threads = torch.get_num_threads()
    assert f"resuming on {threads} torch threads, as the checkpoint was written (this process had {other})" in (
        tmp_path / "r" / "run.log").read_text()
    logits = [(tmp_path / run / "artifacts" / "maskllm" / LOGITS_FILE).read_bytes() for run in ("whole", "r")]
    assert logits[0] == logits[1]
