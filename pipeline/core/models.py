"""Loading a frozen Hugging Face causal LM, finding its prunable linears, and fingerprinting it.

Two ways to load. `load_model` reads the whole checkpoint into every process (`from_pretrained`).
`load_model(..., meta=True)` builds the model on the meta device and reads nothing: every parameter is
*deferred*, registered with a function that reads any rows [start, stop) of it from the checkpoint's
safetensors files (`safe_open(...).get_slice`, which reads those rows and nothing else). Whoever
places the parameters asks for the rows it needs: `pipeline.train.shard`'s FSDP asks each rank for the rows
it owns, so no process ever holds the whole model; `materialize` reads them whole. The checkpoint
layout is Hugging Face's: `model.safetensors`, or `model.safetensors.index.json` (`weight_map`: tensor
name -> file) and its shards, tensor names equal to the model's parameter names.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.schema import where_relative
from maskpipe.pipeline.core.vocab import MODEL_DTYPES

if TYPE_CHECKING:  # the schema is the caller's; loading a model needs only its fields
    from maskpipe.pipeline.core.schema import ModelConfig

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(cfg: ModelConfig, device: str | torch.device | None = None, *, meta: bool = False) -> nn.Module:
    """`AutoModelForCausalLM` from a local directory or a hub id + revision, every parameter frozen.
    With `meta`, on the meta device, every parameter deferred to its checkpoint (module docstring)."""
    from transformers import AutoModelForCausalLM

    _check_exists(cfg.name_or_path)
    if meta:
        return _load_meta(cfg, torch.device(device) if device is not None else resolve_device(cfg.device))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as e:
        raise MaskpipeError(f"model {cfg.name_or_path!r}: cannot load as a causal LM: {e}") from None
    model.requires_grad_(False)
    model.eval()
    prunable_linears(model, cfg)  # refuse unsupported architectures now, not halfway through a run
    return model.to(device or ("cpu" if cfg.offload else resolve_device(cfg.device)))


@dataclass
class Deferred:
    """How a meta parameter becomes real: `rows(start, stop)` gives rows [start, stop) of its value
    (CPU, the parameter's dtype), to be placed on `device`. `order` is when it was deferred: rows are
    produced in that order, since some (a learned mask's initial logits) draw from a shared generator."""
    rows: Callable[[int, int], torch.Tensor]
    device: torch.device
    order: int


_ORDER = itertools.count()


def defer(param: torch.Tensor, rows: Callable[[int, int], torch.Tensor], device: torch.device) -> None:
    """Register how meta tensor `param` is produced (see `Deferred`); it lives as long as the tensor."""
    param.maskpipe_deferred = Deferred(rows, torch.device(device), next(_ORDER))


def deferred(param: torch.Tensor) -> Deferred | None:
    return getattr(param, "maskpipe_deferred", None) if param.is_meta else None


def device_of(weight: torch.Tensor) -> torch.device:
    """Where a weight lives, or will once it is materialized."""
    d = deferred(weight)
    return d.device if d is not None else weight.device


def pending(model: nn.Module) -> list[tuple[Deferred, list[tuple[nn.Module, str]]]]:
    """Every deferred parameter of `model`, in the order it was deferred, with each (module, attribute)
    that holds it (several for tied weights)."""
    found: dict[int, tuple[Deferred, list[tuple[nn.Module, str]]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            d = deferred(p) if p is not None else None
            if d is not None:
                found.setdefault(id(p), (d, []))[1].append((module, name))
    return sorted(found.values(), key=lambda x: x[0].order)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Read every deferred parameter whole, onto its device: the single-process load, from meta."""
    for d, holders in pending(model):
        old = getattr(*holders[0])
        new = nn.Parameter(d.rows(0, old.shape[0]).to(d.device), requires_grad=old.requires_grad)
        for module, name in holders:
            setattr(module, name, new)
    return model


class SafetensorsWeights:
    """A Hugging Face checkpoint directory's safetensors files, read by tensor name and rows."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(directory / "model.safetensors"), "pt") as f:
                self.files = dict.fromkeys(f.keys(), directory / "model.safetensors")
        else:
            raise MaskpipeError(f"model {str(directory)!r}: no model.safetensors or model.safetensors.index.json "
                                "to read in slices")

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of a 0-dim one), cast to `dtype` as from_pretrained casts.
        Always a copy: a slice is a view of the mapped file, which may change on disk after loading."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            sl = f.get_slice(name)
            t = sl[start:stop] if len(sl.get_shape()) else sl[:]
        return t.to(dtype, copy=True)


def _checkpoint_dir(cfg: ModelConfig) -> Path:
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download  # only the tensors and configs, never loaded whole

    try:
        return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's model reference
        raise MaskpipeError(f"model {cfg.name_or_path!r}: cannot fetch its safetensors files: {e}") from None


def _load_meta(cfg: ModelConfig, device: torch.device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = _checkpoint_dir(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(str(directory), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MaskpipeError(f"model {cfg.name_or_path!r}: cannot read its config: {e}") from None
    weights = SafetensorsWeights(directory)
    dtype = DTYPES[cfg.dtype]
    # Parameters on meta, buffers real: non-persistent buffers (rotary frequencies) are computed at
    # construction and are in no checkpoint, so they must be made as from_pretrained makes them.
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        # A parameter's brief real tensor is torch.empty: its pages are never touched, so never resident.
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    finally:
        nn.Module.register_parameter = register
    model.requires_grad_(False)
    model.eval()
    prunable_linears(model, cfg)
    for name, p in model.named_parameters():  # tied weights once, under the name the checkpoint stores
        if name not in weights.files:
            raise MaskpipeError(f"model {cfg.name_or_path!r}: parameter {name} is not in its safetensors files; "
                                "load it whole (workers.sharded_load: false)")
        defer(p, lambda start, stop, name=name, dt=p.dtype: weights.rows(name, start, stop, dt), device)
    return model


def checkpoint_dtype(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The dtype a checkpoint is stored in, as its config.json records it (`dtype`, or the older
    `torch_dtype`); float32 when it records none (what from_pretrained loads then) or one maskpipe does
    not load models in."""
    from transformers import AutoConfig

    _check_exists(name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise MaskpipeError(f"model {name_or_path!r}: cannot read its config: {e}") from None
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    _check_exists(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise MaskpipeError(f"model {cfg.name_or_path!r}: cannot load its tokenizer: {e}") from None


def _check_exists(name_or_path: str) -> None:
    # A hub id is "org/name" or "name"; anything that looks like a filesystem path must exist.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise MaskpipeError(f"model {name_or_path!r}: no such model directory{where_relative(name_or_path)}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks, found by the class names transformers declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return module
    raise MaskpipeError(
        f"unsupported architecture {type(model).__name__}: no list of decoder blocks found "
        f"(looked for {sorted(names) or 'transformers _no_split_modules'})"
    )


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside the decoder blocks, by module name: what a base-model fingerprint covers."""
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    found: dict[str, nn.Linear] = {}
    for name, module in blocks.named_modules(prefix=prefix):
        if type(module).__name__ == "Conv1D":
            raise MaskpipeError(
                f"unsupported architecture {type(model).__name__}: {name} is a GPT-2 style Conv1D "
                "(transposed weight); maskpipe prunes nn.Linear layers only"
            )
        if isinstance(module, nn.Linear):
            found[name] = module
    return found


def prunable_linears(model: nn.Module, cfg: ModelConfig) -> dict[str, nn.Linear]:
    """`nn.Linear` layers inside decoder blocks whose names match the config's include/exclude globs."""
    found = {
        name: module for name, module in decoder_linears(model).items()
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.prune.include)
        and not any(fnmatch.fnmatchcase(name, p) for p in cfg.prune.exclude)
    }
    if not found:
        raise MaskpipeError(
            f"model {cfg.name_or_path!r}: no nn.Linear in the decoder blocks matches "
            f"prune.include={cfg.prune.include} / exclude={cfg.prune.exclude}"
        )
    return found


def base_weight(linear: nn.Linear) -> torch.Tensor:
    """The frozen weight, also while a mask parametrization sits on the layer."""
    p = getattr(linear, "parametrizations", None)
    return p.weight.original if p is not None and "weight" in p else linear.weight


# Hashed in one canonical dtype so that a mask made on a float32 load applies to a bfloat16 load of the
# same checkpoint: rounding to bf16 gives the same values whichever dtype the weights came through.
FINGERPRINT_DTYPE = torch.bfloat16


def fingerprint(linears: dict[str, nn.Linear]) -> str:
    """sha256 over name, shape, dtype and bytes of every prunable weight, one tensor at a time. A
    deferred (meta) weight is read from its checkpoint for the purpose, one tensor at a time, cast
    exactly as a whole load casts it: the same bytes, without the whole model in memory."""
    h = hashlib.sha256()
    for name in sorted(linears):
        w = base_weight(linears[name])
        d = deferred(w)
        w = w.detach()
        h.update(f"{name}|{tuple(w.shape)}|{FINGERPRINT_DTYPE}\n".encode())
        canon = (d.rows(0, w.shape[0]) if d else w).to(device="cpu", dtype=FINGERPRINT_DTYPE).contiguous()
        h.update(canon.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
