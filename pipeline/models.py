"""Loading a frozen Hugging Face causal LM, finding its prunable linears, and fingerprinting it."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import torch
from torch import nn

from pipeline import MaskpipeError
from pipeline.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(cfg: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """`AutoModelForCausalLM` from a local directory or a hub id + revision, every parameter frozen."""
    from transformers import AutoModelForCausalLM

    _check_exists(cfg.name_or_path)
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
    return model.to(device or resolve_device(cfg.device))


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
        raise MaskpipeError(f"model {name_or_path!r}: no such model directory")


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
    """sha256 over name, shape, dtype and bytes of every prunable weight, one tensor at a time."""
    h = hashlib.sha256()
    for name in sorted(linears):
        w = base_weight(linears[name]).detach()
        h.update(f"{name}|{tuple(w.shape)}|{FINGERPRINT_DTYPE}\n".encode())
        canon = w.to(device="cpu", dtype=FINGERPRINT_DTYPE).contiguous()
        h.update(canon.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
