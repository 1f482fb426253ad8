"""Atomic, pickle-free training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is a folder holding `state.safetensors` and `state.json`. A learning loop sees only a
store with `latest()` and `save()`: `CheckpointDir` keeps them as `step-00000100/` folders of a local
directory, each written through `atomic_dir`, so a kill during a save leaves the previous checkpoint
intact, and the oldest beyond `keep` are removed only after a new one is complete. Ray Train workers
use a store with the same two methods that reports the folder to Ray (`workers/learn.py`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import MaskpipeError
from pipeline.artifacts import atomic_dir

TENSORS, META = "state.safetensors", "state.json"


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into flat tensors and JSON-able metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_checkpoint(path: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / TENSORS))
    (path / META).write_text(json.dumps({"step": step, **meta}, indent=1))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    try:
        return load_file(str(path / TENSORS)), json.loads((path / META).read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same error to the user
        raise MaskpipeError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


class CheckpointDir:
    """The last `keep` checkpoints of one stage in a local directory (one process writes them)."""

    def __init__(self, path: str | Path, keep: int):
        self.path, self.keep = Path(path), keep

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.glob("step-*") if (p / META).is_file() and (p / TENSORS).is_file())

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        found = self.list()
        return read_checkpoint(found[-1]) if found else None

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with atomic_dir(self.path / f"step-{step:08d}") as tmp:
            write_checkpoint(tmp, step, tensors, meta)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old)
