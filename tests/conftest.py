import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MICRO = FIXTURES / "models" / "micro-llama"
CORPORA = FIXTURES / "corpora"

# Both cores of the CI machine, unless the caller asks for fewer (e.g. beside other work).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture(scope="session")
def micro_cfg():
    from maskpipe.pipeline.core.schema import ModelConfig

    return ModelConfig(name_or_path=str(MICRO), dtype="float32", device="cpu")


@pytest.fixture()
def micro(micro_cfg):
    """A fresh micro-llama (float32, CPU) with its prunable linears."""
    from maskpipe.pipeline.core.models import load_model, prunable_linears

    model = load_model(micro_cfg)
    return model, prunable_linears(model, micro_cfg)


@pytest.fixture(scope="session")
def tokenizer(micro_cfg):
    from maskpipe.pipeline.core.models import load_tokenizer

    return load_tokenizer(micro_cfg)


@pytest.fixture()
def in_root(monkeypatch):
    """Run from the repository root, where configs name their fixture paths."""
    monkeypatch.chdir(ROOT)
    return ROOT


MODEL_FLAGS = ["--model", str(MICRO), "--dtype", "float32", "--device", "cpu"]


def cli_fails(argv: list[str], capsys, message: str, *absent, one_line: bool = False) -> str:
    """The command exits with 2 and `message` on stderr (no traceback; with `one_line`, exactly one
    `error:` line), and none of `absent` exists."""
    from maskpipe.jobs.cli import main

    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    if one_line:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    for path in absent:
        assert not os.path.exists(path), path
    return err


class Killed(Exception):
    """A process killed mid-stage, as a training loop sees it from its on_log."""


def die_at(step: int):
    """An on_log that kills the training loop when it logs `step` (the checkpoint before it survives)."""

    def on_log(entry: dict) -> None:
        if entry.get("step") == step:
            raise Killed

    return on_log


def stop_at(monkeypatch, kind: str = "learn") -> None:
    """A run in this process stops as Ctrl-C stops it when it reaches its first stage of `kind` (exit 130)."""
    from maskpipe.pipeline.run.runner import LocalBackend

    original = LocalBackend.execute
    stop_kind = kind

    def interrupted(self, kind, ctx):
        if kind.name == stop_kind:
            raise KeyboardInterrupt
        return original(self, kind, ctx)

    monkeypatch.setattr(LocalBackend, "execute", interrupted)
