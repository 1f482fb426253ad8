"""A run's model, loaded once and shared by its stages, and the variants the stages run it as.

A `Session` verifies each artifact once: the base model's fingerprint over an artifact's layers (a
sha256 over the bfloat16 bytes of every masked weight, about 13 GB at 7B) is computed once per set of
layers, and an artifact's decoded, checksummed masks are kept while the same file is used again (the
cells of one variant, a retrieval variant's plan and masks), keyed by the artifact's path and file
stat, so a rewritten artifact is read anew. `LocalBackend` lets go of those masks after each stage.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io import rundir
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, MASKS_FILE, check_compatible, check_disjoint, load_artifact, read_manifest
from maskpipe.pipeline.attention.dynamic_masks import DynamicMask, check_dynamic
from maskpipe.pipeline.attention.plans import AttentionPlan, check_plan, planned
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.core.models import base_weight, fingerprint, load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.sparsity import masked


@dataclass
class Variant:
    """A way of running the base model: dense, masked by an artifact, or (baseline rows only) with
    weights SparseGPT updated, which no artifact carries."""

    name: str
    artifact: Path | None = None
    updated_weights: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def record(self, run_dir: Path) -> dict[str, Any]:
        """The variant as `results.json` stores it: its files relative to the run directory."""
        return {**self.info, "artifact": rundir.relative(run_dir, self.artifact),
                "updated_weights": rundir.relative(run_dir, self.updated_weights)}

    @classmethod
    def from_record(cls, name: str, rec: dict[str, Any], run_dir: Path) -> Variant:
        info = {k: v for k, v in rec.items() if k not in ("artifact", "updated_weights")}
        return cls(name, artifact=rundir.resolve(run_dir, rec.get("artifact")),
                   updated_weights=rundir.resolve(run_dir, rec.get("updated_weights")), info=info)


def _file_key(path: Path) -> tuple:
    """Which artifact files `path` holds now: its path and the stat of its manifest and masks."""
    def stat(p: Path):
        try:
            s = p.stat()
        except OSError:
            return None
        return s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns

    return str(Path(path).resolve()), stat(path / MANIFEST_FILE), stat(path / MASKS_FILE)


class Session:
    """A model, its tokenizer and prunable linears, loaded once and shared by a run's stages."""

    def __init__(self, model_cfg: ModelConfig, meta: bool = False):
        """`meta`: the model on the meta device, read later by whoever places it (`load_model`)."""
        self.model_cfg = model_cfg
        self.tokenizer = load_tokenizer(model_cfg)
        try:
            self.model = load_model(model_cfg, meta=meta)
        except SafetensorError as e:  # a truncated or corrupted weights file
            raise MaskpipeError(f"model {model_cfg.name_or_path!r}: cannot load its weights: {e}") from None
        self.linears = prunable_linears(self.model, model_cfg)
        self._fingerprints: dict[frozenset[str], str] = {}
        self._last: tuple[tuple, dict[str, torch.Tensor], dict[str, Any]] | None = None

    def base_model_info(self) -> dict[str, Any]:
        return {
            "name_or_path": self.model_cfg.name_or_path,
            "revision": self.model_cfg.revision,
            "architecture": type(self.model).__name__,
        }

    def fingerprint(self, layers: dict[str, torch.nn.Linear]) -> str:
        """`pipeline.core.models.fingerprint` of these base layers, hashed once per Session. The base weights
        never change under a Session: a variant's updated weights are swapped in only while it runs."""
        key = frozenset(layers)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(layers)
        return self._fingerprints[key]

    def load_artifact(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """An artifact's masks and manifest, masks and attention plan checked against this base model.
        The same files asked for again are not read, checksummed or fingerprinted again."""
        key = _file_key(Path(path))
        if self._last is not None and self._last[0] == key:
            return self._last[1], self._last[2]
        masks, manifest = load_artifact(path)
        check_compatible(manifest, self.linears, str(path), fingerprint=self.fingerprint)
        if "dynamic" in manifest and "attention" in manifest:  # each replaces the model's attention
            raise MaskpipeError(f"{path}: carries both an attention plan and a dynamic mask; one attention mask "
                                "applies at a time")
        if "attention" in manifest:
            check_plan(manifest["attention"], self.model, str(path), fingerprint=self.fingerprint)
        if "dynamic" in manifest:
            check_dynamic(manifest["dynamic"], self.model, str(path), fingerprint=self.fingerprint)
        self._last = (key, masks, manifest)  # one artifact's masks at a time: at 7B they are gigabytes
        return masks, manifest

    def forget_masks(self) -> None:
        """Let go of the last artifact's decoded masks (a stage is done with them); what was verified
        stays verified."""
        self._last = None

    def load_artifacts(self, paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[Path, dict[str, Any]]]:
        """Artifacts applied together: their masks merged, each checked against this base model, all
        refused if two mask the same layer or carry a plan each (`check_disjoint`, before any mask loads)."""
        check_disjoint([(str(p), read_manifest(p)) for p in paths])
        masks, manifests = {}, {}
        for path in paths:
            found, manifests[path] = self.load_artifact(path)
            masks |= found
        return masks, manifests

    def masks_of(self, variant: Variant) -> dict[str, torch.Tensor]:
        return self.contents(variant)[0]

    def contents(self, variant: Variant) -> tuple[dict[str, torch.Tensor], AttentionPlan | None]:
        """A variant's N:M masks and attention plan, checked against this base model."""
        masks, manifest = ({}, {}) if variant.artifact is None else self.load_artifact(variant.artifact)
        return masks, AttentionPlan.from_json(manifest["attention"]) if "attention" in manifest else None

    def plan_of(self, variant: Variant) -> AttentionPlan | None:
        return self.contents(variant)[1]

    def dynamic_of(self, variant: Variant) -> DynamicMask | None:
        """A variant's dynamic attention mask (its scorer read and checksummed), checked against this base model."""
        if variant.artifact is None:
            return None
        manifest = self.load_artifact(variant.artifact)[1]
        if "dynamic" not in manifest:
            return None
        return DynamicMask.from_json(manifest["dynamic"], Path(variant.artifact), str(variant.artifact))

    @contextmanager
    def running(self, variant: Variant, dynamic: bool = True):
        """The model as `variant` describes it (masks, attention plan or dynamic mask: not with `dynamic`
        False, for a caller that decodes under the mask itself); the base weights are restored on exit."""
        masks, plan = self.contents(variant)  # checked against the base model before its weights are swapped
        dyn = self.dynamic_of(variant) if dynamic else None
        saved = {}
        try:
            if variant.updated_weights is not None:
                for name, w in load_file(str(variant.updated_weights)).items():
                    base = base_weight(self.linears[name])
                    saved[name] = base.detach().clone()
                    base.data.copy_(w)
            with masked(self.linears, masks), planned(self.model, plan), \
                    (dyn.running(self.model) if dyn is not None else nullcontext()):
                yield self.model
        finally:
            for name, w in saved.items():
                base_weight(self.linears[name]).data.copy_(w)
