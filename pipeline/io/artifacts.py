"""Mask artifacts: compactly encoded masks stored apart from the base weights, with a manifest.

An artifact is a directory:
  masks.safetensors  one uint8 tensor `masks`: every masked linear's mask, flattened row-major and
                     encoded by `pipeline.nm.encoding` (0.647 bits per weight at 2:4), the layers back to
                     back in name order, each at the byte offset the manifest gives
  manifest.json      format version, base model id/revision/fingerprint, pattern, encoding, per-layer
                     shapes, offsets and sha256 checksums, method and its parameters, data summary,
                     metrics, the full config
  logits.safetensors optional soft state of a learned mask: per layer [out, in/M, C(M,N)] logits over
                     the candidates in lexicographic order, so the artifact can seed another task's mask

An artifact may instead, or also, carry a per-head attention plan (manifest key `attention`: per layer
and KV head its pattern, sink, window and gate, and the fingerprint of the base model's decoder
linears); an artifact with only a plan has no masks, `pattern` null and `layers` empty. It may also
carry a dynamic attention mask (manifest key `dynamic`, and for a learned one its scorer's tensors in
`scorer.safetensors`): the format is `pipeline.attention.dynamic_masks`'s docstring.

It never holds base weights, and it never applies to a model whose fingerprint or shapes differ.
Format 1 (one bitmap tensor per layer, `packbits-le`, 1 bit per weight) is still read.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maskpipe.pipeline import MaskpipeError, __version__
from maskpipe.pipeline.nm.encoding import Codec
from maskpipe.pipeline.core.models import base_weight, fingerprint
from maskpipe.pipeline.nm.sparsity import is_nm
from maskpipe.pipeline.core.vocab import Pattern
from maskpipe.pipeline.io.rundir import RunLock

FORMAT = "maskpipe-masks"
FORMAT_VERSION = 2
READS = (1, 2)  # format 1: one packbits-le tensor per layer, 1 bit per weight
MASKS_FILE, MANIFEST_FILE, LOGITS_FILE = "masks.safetensors", "manifest.json", "logits.safetensors"
BLOB = "masks"  # the one tensor of a format-2 masks file
REQUIRED = ("format", "format_version", "base_model", "pattern", "encoding", "layers", "method")
LAYER_KEYS = {1: ("shape", "sha256"), 2: ("shape", "offset", "nbytes", "sha256")}


def public_mode(directory: bool = False) -> int:
    """The mode open() would give a new file (or mkdir a directory) under the process's umask: what
    mkstemp/mkdtemp's owner-only temporaries are set to before they take their final name."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


_HELD: dict[Path, int] = {}  # output paths this process holds the lock of: how many times


@contextmanager
def output_lock(dest: str | Path):
    """One writer per output path, as per run directory: an exclusive `flock` on `.NAME.lock` beside
    `dest`, held for the whole command that writes it (the CLI takes it for every `--out`) and for
    every `atomic_dir`. A second writer, in any process, is refused with one line naming the first;
    within one process the lock is re-entrant. The lock file stays (removing it would race)."""
    dest = Path(dest).resolve()
    if dest in _HELD:
        _HELD[dest] += 1
        try:
            yield
        finally:
            _HELD[dest] -= 1
        return
    check_writable(dest)
    with RunLock(dest, path=dest.parent / f".{dest.name}.lock", what="output path"):
        _HELD[dest] = 1
        try:
            yield
        finally:
            del _HELD[dest]


@contextmanager
def atomic_dir(dest: str | Path, replaces: str | None = None):
    """Yield a temporary sibling directory; on success it replaces `dest`, on failure it vanishes.

    A reader sees the old directory or the new one, never a half-written one: the old one is moved
    aside (not deleted) before the rename, and removed only after the new one is in place; a success
    also removes what writers killed before it left beside `dest`. With
    `replaces`, an existing non-empty `dest` is replaced only if it holds that file, i.e. is what the
    caller writes: a mistyped output path never deletes someone's directory. It holds `dest`'s
    `output_lock` throughout.
    """
    dest = Path(dest)
    with output_lock(dest):
        if replaces:
            check_replaceable(dest, replaces)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _replace_dir(dest) as tmp:
            yield tmp


@contextmanager
def _replace_dir(dest: Path):
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        for f in [tmp, *tmp.rglob("*")]:
            # mkdtemp and safetensors create owner-only files; what we publish is for everyone to read
            os.chmod(f, public_mode(f.is_dir()))
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
        # What killed writers of `dest` left behind: their temporary directories, or the version one
        # had set aside just before it died. One writer per destination, so none of it is in use.
        for pattern in (f".{glob.escape(dest.name)}.tmp-*", f".{glob.escape(dest.name)}.old-*"):
            for debris in dest.parent.glob(pattern):
                shutil.rmtree(debris, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(dest: str | Path, replaces: str, accept=None, what: str | None = None) -> None:
    """The rule every output path follows: `dest` may be written if it is missing or an empty
    directory, or replaced if it is an earlier output of the same kind: a directory holding the file
    `replaces`, for which `accept(dest / replaces)` holds when given. Callers check it before the
    work that produces the output, so a mistyped path costs nothing and deletes nothing."""
    dest = Path(dest)
    check_writable(dest)
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    marker = dest / replaces
    if not marker.is_file():
        raise MaskpipeError(f"{dest}: exists and holds no {replaces}; refusing to replace it (choose a new directory)")
    if accept is not None and not accept(marker):
        raise MaskpipeError(f"{dest}: exists and is not an earlier {what or replaces}; refusing to replace it "
                            "(choose a new directory)")


def check_writable(dest: str | Path) -> None:
    """`dest` can be created: its nearest existing ancestor is a directory this process may write."""
    dest = Path(dest).absolute()
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MaskpipeError(f"{dest}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise MaskpipeError(f"{dest}: {parent} is not writable")
            return


def check_replaceable_file(dest: str | Path, accept, what: str) -> None:
    """`check_replaceable` for an output that is one file: an existing `dest` is replaced only if
    `accept(dest)` says it is an earlier output of that kind."""
    dest = Path(dest)
    check_writable(dest)
    if dest.is_dir():
        raise MaskpipeError(f"{dest}: is a directory; give a file path")
    if dest.exists() and not accept(dest):
        raise MaskpipeError(f"{dest}: exists and is not an earlier {what}; refusing to replace it (choose a new path)")


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def atomic_file(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Write a file atomically (temporary file beside it, `write(f)`, fsync, rename), readable as the
    umask allows (mkstemp's temporary is owner-only). Nothing is left behind if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> None:
    atomic_file(path, lambda f: f.write(text))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()


def save_artifact(
    path: str | Path,
    masks: dict[str, torch.Tensor],
    linears: dict[str, nn.Linear],
    *,
    base_model: dict[str, Any],
    pattern: Pattern | str | None,
    method: dict[str, Any],
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    soft_logits: dict[str, torch.Tensor] | None = None,
    attention: dict[str, Any] | None = None,
    dynamic: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write an artifact atomically. `base_model` holds name_or_path and revision; the fingerprint
    is computed here over exactly the layers the artifact masks, or for a plan alone is the plan's
    (`AttentionPlan.to_json(model)`: the fingerprint of every decoder linear), unless `base_model`
    brings one computed earlier (a sharded trainer leaves the weights partitioned). `dynamic`: a dynamic
    mask's manifest entry and its scorer's tensors (`DynamicMask.to_json`, `.tensors`)."""
    if not masks and attention is None and dynamic is None:
        raise MaskpipeError("an artifact needs masks, an attention plan or both, or a dynamic mask")
    head_print = (attention or (dynamic[0] if dynamic else {})).get("fingerprint")
    pattern = Pattern.parse(pattern) if masks else None
    codec = Codec.best(*pattern) if masks else None
    encoded, layers, offset = [], {}, 0
    for name in sorted(masks):
        mask = masks[name].bool()
        if not is_nm(mask, codec.n, codec.m):
            raise MaskpipeError(f"{name}: mask is not {pattern}")
        encoded.append(codec.encode(mask))
        layers[name] = {"shape": list(mask.shape), "offset": offset, "nbytes": len(encoded[-1]),
                        "sha256": _sha256(encoded[-1])}
        offset += len(encoded[-1])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "maskpipe_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"fingerprint": base_model.get("fingerprint") or (
            fingerprint({k: linears[k] for k in masks}) if masks else head_print), **base_model},
        "pattern": str(pattern) if masks else None,
        "encoding": codec.to_json() if codec else None,
        "layers": layers,
        "method": method,
        "data": data or {},
        "metrics": metrics or {},
        "config": config or {},
    }
    if attention is not None:
        manifest["attention"] = attention
    if dynamic is not None:
        manifest["dynamic"] = dynamic[0]
    if soft_logits is not None:
        manifest["soft"] = {"file": LOGITS_FILE, "dtype": str(next(iter(soft_logits.values())).dtype).split(".")[-1],
                            "candidates": "itertools.combinations(range(M), N) order"}
    with atomic_dir(path, replaces=MANIFEST_FILE) as tmp:
        blob = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.uint8)
        save_file({BLOB: torch.from_numpy(blob)}, str(tmp / MASKS_FILE), metadata={"format": FORMAT})
        if soft_logits is not None:
            save_file({k: v.contiguous() for k, v in soft_logits.items()}, str(tmp / LOGITS_FILE))
        if dynamic is not None and dynamic[1]:
            save_file(dynamic[1], str(tmp / dynamic[0]["scorer"]["file"]))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    where = path / MANIFEST_FILE
    if not where.is_file():
        raise MaskpipeError(f"{path}: not a mask artifact (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MaskpipeError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MaskpipeError(f"{where}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in READS:
        raise MaskpipeError(f"{where}: format_version {version!r} is not one this maskpipe ({__version__}) reads "
                            f"(it reads {', '.join(map(str, READS))})")
    missing = [k for k in REQUIRED if k not in manifest]
    missing += [f"base_model.{k}" for k in ("name_or_path", "fingerprint") if k not in manifest.get("base_model", {})]
    if isinstance(manifest.get("layers"), dict):
        missing += [f"layers.{name}.{k}" for name, info in manifest["layers"].items() for k in LAYER_KEYS[version]
                    if not isinstance(info, dict) or k not in info]
    if missing:
        raise MaskpipeError(f"{where}: missing keys: {', '.join(missing)}")
    return manifest


def _codec(manifest: dict[str, Any], where: Path) -> Codec:
    try:
        return Codec.from_json(*Pattern.parse(manifest["pattern"]), manifest["encoding"])
    except ValueError as e:
        raise MaskpipeError(f"{where}: {e}") from None


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(masks, manifest), every layer checked against its checksum and its N:M pattern."""
    path = Path(path)
    manifest = read_manifest(path)
    layers = manifest["layers"]
    if not layers:
        return {}, manifest
    codec = _codec(manifest, path / MANIFEST_FILE)
    try:
        tensors = load_file(str(path / MASKS_FILE))
    except (SafetensorError, OSError) as e:
        raise MaskpipeError(f"{path / MASKS_FILE}: unreadable ({e})") from None
    if manifest["format_version"] == 1:
        if set(tensors) != set(layers):
            raise MaskpipeError(f"{path}: {MASKS_FILE} and {MANIFEST_FILE} list different layers")
        stored = {name: tensors[name].numpy() for name in layers}
    else:
        blob = tensors.get(BLOB)
        size = sum(info["nbytes"] for info in layers.values())
        if blob is None or blob.dtype != torch.uint8 or blob.numel() != size:
            found = f"no uint8 tensor {BLOB!r}" if blob is None or blob.dtype != torch.uint8 else f"{blob.numel()} bytes"
            raise MaskpipeError(f"{path / MASKS_FILE}: holds {found} where the manifest lists {size} bytes "
                                "(truncated or corrupted artifact)")
        blob = blob.numpy()
        stored = {name: blob[info["offset"] : info["offset"] + info["nbytes"]] for name, info in layers.items()}
    masks = {}
    for name, info in layers.items():
        if _sha256(stored[name]) != info["sha256"]:
            raise MaskpipeError(f"{path / MASKS_FILE}: {name}: checksum mismatch (corrupted artifact)")
        try:
            masks[name] = codec.decode(stored[name], info["shape"])
        except ValueError as e:
            raise MaskpipeError(f"{path / MASKS_FILE}: {name}: {e}") from None
        if not is_nm(masks[name], codec.n, codec.m):
            raise MaskpipeError(f"{path}: {name}: mask is not {manifest['pattern']}")
    return masks, manifest


def load_soft_logits(path: str | Path) -> dict[str, torch.Tensor]:
    """The stored logits of a learned mask, as float32."""
    path = Path(path)
    if "soft" not in read_manifest(path):
        raise MaskpipeError(f"{path}: the artifact has no soft state (logits); use its mask as the prior instead")
    try:
        return {k: v.float() for k, v in load_file(str(path / LOGITS_FILE)).items()}
    except (SafetensorError, OSError) as e:
        raise MaskpipeError(f"{path / LOGITS_FILE}: unreadable ({e})") from None


def check_compatible(manifest: dict[str, Any], linears: dict[str, nn.Linear], source: str = "artifact",
                     fingerprint=fingerprint) -> None:
    """Refuse, before anything is touched, masks made for another model or other shapes (an attention
    plan is checked against the model by `pipeline.attention.plans.check_plan`). `fingerprint` hashes the
    base layers (a `Session` passes its cached one)."""
    layers = manifest["layers"]
    if not layers:
        return
    missing = sorted(set(layers) - set(linears))
    if missing:
        raise MaskpipeError(
            f"{source}: the model has no layer {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; the artifact was made for {manifest['base_model']['name_or_path']}"
        )
    for name, info in layers.items():
        shape = list(base_weight(linears[name]).shape)
        if shape != info["shape"]:
            raise MaskpipeError(f"{source}: {name}: artifact shape {info['shape']} != model shape {shape}")
    ours = fingerprint({k: linears[k] for k in layers})
    theirs = manifest["base_model"]["fingerprint"]
    if ours != theirs:
        raise MaskpipeError(
            f"{source}: base model fingerprint mismatch: the artifact was made for "
            f"{manifest['base_model']['name_or_path']} ({theirs}), this model is {ours}"
        )


def check_disjoint(manifests: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse artifacts that cannot apply together, by their manifests alone: two that mask the same
    layer, two attention plans, or artifacts made for different architectures. (Each is checked against
    the base model's fingerprint and shapes on its own: see `check_compatible`.)"""
    owner: dict[str, str] = {}
    for source, manifest in manifests:
        for layer in manifest["layers"]:
            if layer in owner:
                raise MaskpipeError(f"{owner[layer]} and {source} both mask {layer}: artifacts applied together "
                                    "must mask different layers")
            owner[layer] = source
    plans = [source for source, manifest in manifests if "attention" in manifest]
    if len(plans) > 1:
        raise MaskpipeError(f"{plans[0]} and {plans[1]} both carry an attention plan: apply at most one")
    # One attention implementation runs at a time: a static plan or a dynamic mask, not both.
    dyn = [source for source, manifest in manifests if "dynamic" in manifest]
    if dyn and len(plans) + len(dyn) > 1:
        raise MaskpipeError(f"{dyn[0]} carries a dynamic mask and {(plans + dyn[1:])[0]} another attention mask: "
                            "apply at most one dynamic mask, without a static plan")
    archs = {source: manifest["base_model"].get("architecture") for source, manifest in manifests}
    if len(set(archs.values()) - {None}) > 1:
        raise MaskpipeError("the artifacts were made for different architectures: "
                            + ", ".join(f"{source} for {arch}" for source, arch in archs.items()))


@torch.no_grad()
def materialize(model: nn.Module, tokenizer, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
                out: str | Path, provenance: dict[str, Any], patterns: dict[str, str],
                extra: dict[str, Path] | None = None) -> Path:
    """Write a model directory that `transformers` loads, with weights ⊙ mask: plain dense safetensors
    with zeros, not a compressed-tensors checkpoint (no `quantization_config`, so vLLM and llm-compressor
    see an ordinary dense model). `config.json` records the sparsity under `maskpipe_sparsity`
    (`patterns`: layer -> N:M; field names borrowed from compressed-tensors' sparsity config, which no
    loader reads from there); `maskpipe.json` holds `provenance`; `extra` files are copied in by name.

    This multiplies the in-memory weights of `model`: call it on a model loaded for the export."""
    for name, mask in masks.items():
        w = base_weight(linears[name])
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    structures = sorted(set(patterns.values()))
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    model.config.maskpipe_sparsity = {
        "format": "dense",
        "sparsity_structure": structures[0] if len(structures) == 1 else structures or None,
        "global_sparsity": round(1 - kept / total, 6) if total else 0.0,  # over the masked layers
        "targets": sorted(masks),
        "provenance": "maskpipe.json",
    }
    with atomic_dir(out, replaces="maskpipe.json") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "maskpipe.json").write_text(json.dumps(provenance, indent=2, default=str))
        for name, src in (extra or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out)
