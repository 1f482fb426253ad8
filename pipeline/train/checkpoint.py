"""Atomic, pickle-free training checkpoints that any number of workers can write and read.

A checkpoint is a folder: `state.json` (step, stream position, log history, ...) and one
`shard-RRRRR.safetensors` per rank that holds state. A tensor is stored as row ranges: each rank
writes the rows it owns (the file's metadata says where they start), so sharded training never
gathers its mask state to save it, and a reader asks for any rows of any tensor, whatever number of
ranks wrote them. That is how a run resumes on a different number of workers, and how the shards are
consolidated.

A learning loop sees only a store: `save(step, tensors, meta)`, called by every rank, and `latest()`,
a context manager that yields the newest `Checkpoint` or None. `CheckpointDir` keeps them as
`step-00000100/` folders of a directory every rank sees, each completed by one rename, so a kill
during a save leaves the previous checkpoint intact; the oldest beyond `keep` are removed only after a
new one is complete. Ray Train workers use a store with the same two methods (`workers/learn.py`).

Every shard carries its sha256: beside it (`sha256-RRRRR`, written by the rank that wrote it)
and, in a `CheckpointDir`, in `state.json` (`shards`: file -> sha256, gathered by rank 0 before the
rename). A checkpoint whose shard is missing or differs from its checksum is refused on reading, and
`CheckpointDir.latest` names it and the previous checkpoint to resume from instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from maskpipe.pipeline import MaskpipeError

META = "state.json"


def sum_file(shard: Path) -> Path:
    """Where the sha256 of `shard-RRRRR.safetensors` is kept beside it: `sha256-RRRRR`."""
    return shard.with_name("sha256-" + shard.name.removeprefix("shard-").removesuffix(".safetensors"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Rows(NamedTuple):
    """Rows [start, start + len(tensor)) of a tensor that is larger than what one rank holds (every
    checkpointed tensor has at least one dimension: rows)."""
    tensor: torch.Tensor
    start: int


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def write_shard(path: Path, step: int, tensors: dict[str, torch.Tensor | Rows], meta: dict[str, Any],
                rank: int) -> None:
    """This rank's part of a checkpoint; rank 0 also writes the JSON state (`step` and `meta`)."""
    rows = {k: v if isinstance(v, Rows) else Rows(v, 0) for k, v in tensors.items()}
    if rows:  # a rank whose rows another rank writes (a replica) writes no shard
        shard = path / f"shard-{rank:05d}.safetensors"
        save_file({k: r.tensor.detach().contiguous().cpu() for k, r in rows.items()},
                  str(shard), metadata={k: str(r.start) for k, r in rows.items()})
        sum_file(shard).write_text(file_sha256(shard))
    if rank == 0:
        (path / META).write_text(json.dumps({"step": step, **meta}, indent=1))


class Checkpoint:
    """Reads a checkpoint folder: `meta`, and any rows of any tensor across the shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META).read_text())
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same error to the user
            raise MaskpipeError(f"{self.path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        self._verify()
        try:
            self._index: dict[str, list[tuple[int, int, Path]]] = {}
            for f in sorted(self.path.glob("shard-*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    starts = sf.metadata() or {}
                    for k in sf.keys():
                        start = int(starts[k])
                        self._index.setdefault(k, []).append((start, start + sf.get_slice(k).get_shape()[0], f))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same error to the user
            raise MaskpipeError(f"{self.path}: unreadable checkpoint ({type(e).__name__}: {e})") from None

    def _verify(self) -> None:
        """Every shard state.json lists is there, and every shard matches its checksum."""
        listed = self.meta.get("shards", {}) if isinstance(self.meta, dict) else {}
        for name in sorted(listed):
            if not (self.path / name).is_file():
                raise MaskpipeError(f"{self.path}: damaged checkpoint: {name} is missing")
        for f in sorted(self.path.glob("shard-*.safetensors")):
            side = sum_file(f)
            want = listed.get(f.name) or (side.read_text().strip() if side.is_file() else None)
            if want is not None and file_sha256(f) != want:
                raise MaskpipeError(f"{self.path}: damaged checkpoint: {f.name} does not match its sha256")

    @property
    def step(self) -> int:
        return self.meta["step"]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of `key` (all rows by default), assembled from every shard that has some."""
        if key not in self._index:
            raise MaskpipeError(f"{self.path}: checkpoint has no tensor {key!r}")
        parts = sorted(self._index[key])
        stop = parts[-1][1] if stop is None else stop
        pieces, at = [], start
        if start >= stop:  # a rank that owns no rows of a small tensor
            with safe_open(str(parts[0][2]), "pt") as sf:
                return sf.get_slice(key)[0:0]
        for a, b, f in parts:
            if b <= at or at >= stop:
                continue
            if a > at:
                break
            with safe_open(str(f), "pt") as sf:
                pieces.append(sf.get_slice(key)[at - a: min(b, stop) - a])
            at = min(b, stop)
        if at < stop:
            raise MaskpipeError(f"{self.path}: {key}: rows {at}..{stop} are in no shard (incomplete checkpoint)")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class CheckpointDir:
    """The last `keep` checkpoints of one stage in a directory that every rank sees."""

    def __init__(self, path: str | Path, keep: int):
        self.path, self.keep = Path(path), keep

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (the temporary folders of unfinished saves are not listed)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.glob("step-*") if (p / META).is_file())

    @contextlib.contextmanager
    def latest(self):
        found = self.list()
        try:
            ckpt = Checkpoint(found[-1]) if found else None
        except MaskpipeError as e:
            instead = (f"delete it to resume from step {int(found[-2].name.split('-')[-1])} ({found[-2]})"
                       if len(found) > 1 else "delete it to start the stage over")
            raise MaskpipeError(f"{e}; {instead}") from None
        yield ckpt

    def save(self, step: int, tensors: dict[str, torch.Tensor | Rows], meta: dict[str, Any]) -> None:
        rank, world = rank_world()
        final = self.path / f"step-{step:08d}"
        tmp = self.path / f".step-{step:08d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        _barrier(world)
        write_shard(tmp, step, tensors, meta, rank)
        for f in tmp.iterdir():
            if f.name in (f"shard-{rank:05d}.safetensors", f"sha256-{rank:05d}") or (rank == 0 and f.name == META):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _barrier(world)
        if rank == 0:
            # state.json records every rank's shard checksum; written (and synced) before the rename
            sums = {f.name: sum_file(f).read_text().strip() for f in sorted(tmp.glob("shard-*.safetensors"))}
            state = json.loads((tmp / META).read_text())
            with open(tmp / META, "w") as fh:
                fh.write(json.dumps({**state, "shards": sums}, indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old)
        _barrier(world)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
