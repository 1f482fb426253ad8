"""Per-device memory plans, from the model's config alone (no weights are loaded): of a learning stage
(`memory_plan`), of loading it under fsdp (`loading_plan`), and of a one-shot stage (`oneshot_plan`).

The model is built on the meta device, so every architecture transformers knows is counted exactly;
the bytes per item follow from what each strategy keeps on a device (see `pipeline.train.shard`):

  frozen weights    all parameters in the model dtype; sharded by fsdp and ZeRO-3
  gathered blocks   fsdp / ZeRO-3 all-gather one decoder block and prefetch the next: 2 blocks whole,
                    and the running block's unsharded gradients
  mask logits       C(M,N) (or M) logits per group of M masked weights; sharded by fsdp and ZeRO-3
  optimizer state   AdamW's two moments in the logits' dtype (DeepSpeed: fp32 moments and an fp32
                    master copy); sharded by fsdp and ZeRO 2/3
  gradients         one per logit (DDP also keeps its bucket copy); sharded by fsdp and ZeRO 2/3
  activations       what the backward pass keeps: per masked weight of a live block, the masked weight,
                    the mask and the candidate probabilities; per token of a live block its saved
                    activations (LLaMA-style block with SDPA attention: about 10·hidden + 4·kv_hidden
                    + 5·intermediate values, and the norms' fp32 inputs); the LM head's logits and loss.
                    With activation checkpointing only block inputs stay, and one block is live at a time
  workspace         the soft-mask temporaries of the largest linear (noise, scaled logits, softmax),
                    plus a fixed allowance on CUDA for the context, communication buffers and
                    allocator slack
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maskpipe.pipeline.core.models import DTYPES, decoder_blocks, prunable_linears

GiB = 1024**3
CUDA_RESERVE = 2 * GiB  # CUDA context, NCCL buffers and allocator fragmentation: a rule of thumb
ITEMS = ("frozen weights", "gathered blocks", "mask logits", "optimizer state", "gradients", "activations",
         "workspace")


@dataclass
class Shape:
    """What the plan needs to know about a model."""
    params: int  # every parameter
    masked: int  # weights under a learned mask
    block_params: int  # the largest decoder block's parameters
    block_masked: int  # ... and its masked weights
    largest_linear: int  # weights of the largest masked linear
    blocks: int
    hidden: int
    intermediate: int
    kv_hidden: int
    vocab: int


def model_shape(hf_config, model_cfg) -> Shape:
    """Count a model built from `hf_config` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=model_cfg.trust_remote_code)
    linears = prunable_linears(model, model_cfg)
    blocks = decoder_blocks(model)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    per_block = [sum(lin.weight.numel() for name, lin in linears.items() if lin in set(b.modules())) for b in blocks]
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        masked=sum(lin.weight.numel() for lin in linears.values()),
        block_params=block_params, block_masked=max(per_block),
        largest_linear=max(lin.weight.numel() for lin in linears.values()),
        blocks=len(blocks), hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        kv_hidden=getattr(cfg, "num_key_value_heads", heads) * head_dim, vocab=cfg.vocab_size,
    )


def memory_plan(shape: Shape, *, n: int, m: int, micro_batch: int, seqlen: int, strategy: str, world: int,
                zero_stage: int = 3, activation_checkpointing: bool = False, logits_per_group: str = "candidates",
                logits_dtype: str = "float32", model_dtype: str = "bfloat16", cuda: bool = True,
                shard_group: int | None = None) -> dict[str, int]:
    """Bytes per device for each item of `ITEMS`, for one rank of `world` (fsdp with `shard_group`:
    sharded over groups of that many ranks, replicated across them)."""
    wb = DTYPES[model_dtype].itemsize
    ab = 2 if cuda else wb  # activations: bf16 autocast on CUDA; on CPU, no autocast: the model's dtype
    width = math.comb(m, n) if logits_per_group == "candidates" else m
    logits = shape.masked // m * width
    block_logits = shape.block_masked // m * width
    deepspeed = strategy == "deepspeed"
    lb = 2 if deepspeed and cuda else DTYPES[logits_dtype].itemsize  # DeepSpeed's bf16 mode casts the logits
    shard_params = strategy == "fsdp" or (deepspeed and zero_stage == 3)
    shard_state = strategy == "fsdp" or deepspeed
    shards = shard_group if strategy == "fsdp" and shard_group else world
    p_div, s_div = (shards if shard_params else 1), (shards if shard_state else 1)

    optimizer = logits * (12 if deepspeed else 2 * lb)  # DeepSpeed: fp32 master + two fp32 moments
    grads = logits * (4 if deepspeed else lb) * (2 if strategy == "ddp" and world > 1 else 1)
    # fsdp / ZeRO-3: the block running and the one prefetched, whole, and the running block's gradients
    gathered = 2 * (shape.block_params * wb + block_logits * lb) + block_logits * lb if shard_params else 0

    tokens = micro_batch * seqlen
    per_token_block = ab * (10 * shape.hidden + 4 * shape.kv_hidden + 5 * shape.intermediate) + 8 * shape.hidden
    per_masked = ab * 2 + 4 * math.comb(m, n) / m  # masked weight, mask, probabilities over the candidates (fp32)
    live_block = tokens * per_token_block + shape.block_masked * per_masked
    head = tokens * shape.vocab * (ab + 8)  # logits, fp32 log-softmax for the loss and its gradient
    if activation_checkpointing:
        activations = shape.blocks * tokens * shape.hidden * ab + live_block + head
    else:
        activations = shape.blocks * live_block + head
    workspace = int(3 * shape.largest_linear * 4 * math.comb(m, n) / m) + (CUDA_RESERVE if cuda else 0)
    return {
        "frozen weights": shape.params * wb // p_div,
        "gathered blocks": gathered,
        "mask logits": logits * lb // p_div,
        "optimizer state": optimizer // s_div,
        "gradients": grads // s_div,
        "activations": int(activations),
        "workspace": workspace,
    }


def loading_plan(shape: Shape, *, n: int, m: int, world: int, sharded: bool, model_dtype: str = "bfloat16",
                 logits_per_group: str = "candidates", logits_dtype: str = "float32") -> dict[str, int]:
    """Peak bytes per rank of an fsdp learning stage from loading the model to its first step.

    A whole load (`sharded=False`) holds every frozen weight and, before `fully_shard` cuts them,
    every layer's initial logits; `from_pretrained` also maps the checkpoint's pages while it copies
    them into the model (a checkpoint in the model's dtype assumed). A load from meta
    (`pipeline.core.models`) holds only this rank's rows of weights and logits; in flight, one layer's
    initial logits made whole (drawn in float32, then cast), since the random draw must be the one an
    ordinary load makes."""
    wb, lb = DTYPES[model_dtype].itemsize, DTYPES[logits_dtype].itemsize
    width = math.comb(m, n) if logits_per_group == "candidates" else m
    logits = shape.masked // m * width
    div = world if sharded else 1
    return {
        "frozen weights": shape.params * wb // div,
        "mask logits": logits * lb // div,
        "in flight": shape.largest_linear // m * width * (4 + lb) if sharded else shape.params * wb,
    }


def oneshot_plan(shape: Shape, *, method: str, n_samples: int, seqlen: int, batch_size: int,
                 model_dtype: str = "bfloat16", offload: bool = False, cuda: bool = True) -> dict[str, int]:
    """Device bytes of a one-shot stage (`pipeline.nm.oneshot`), LLaMA-style blocks (q, k, v, o, gate,
    up read `hidden` inputs, down reads `intermediate`). Whole model on the device, or with `offload`
    only what lies outside the blocks (embeddings, head) and the one block being calibrated. Every
    calibration sample's hidden states are kept twice (a block's inputs and its outputs); SparseGPT
    keeps a block's Hessians (in² fp32 per linear) and inverts the largest; Wanda one norm per input."""
    wb = DTYPES[model_dtype].itemsize
    block = shape.block_params * wb
    weights = (shape.params - shape.blocks * shape.block_params) * wb + block if offload else shape.params * wb
    h, i = shape.hidden, shape.intermediate
    per_token = 3 * h + 2 * shape.kv_hidden + 3 * i  # a block's no-grad forward: projections, MLP
    largest_in = max(h, i)  # down_proj reads the MLP width: the largest Hessian inverted
    stats = {"sparsegpt": 4 * (6 * h * h + i * i), "wanda": 4 * (6 * h + i)}.get(method, 0)
    work = {"sparsegpt": 4 * (2 * shape.largest_linear + 3 * largest_in * largest_in),
            "wanda": 2 * 4 * shape.largest_linear}.get(method, 0)
    calibrating = method != "magnitude"
    return {
        "frozen weights": weights if calibrating or not offload else shape.largest_linear * wb,
        "calibration activations": 2 * n_samples * seqlen * h * wb if calibrating else 0,
        "block forward": batch_size * seqlen * per_token * wb if calibrating else 0,
        "statistics": stats,
        "pruning workspace": work,
        "workspace": CUDA_RESERVE if cuda else 0,
    }


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', or a number of bytes."""
    units = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
             "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in units:
        raise ValueError(f"not an amount of memory: {text!r} (e.g. 80GiB)")
    return int(float(num) * units[unit])


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / 1024**2:.1f} MiB"


def count(x: int) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M"


def format_plan(plan: dict[str, int], capacity: int | None = None) -> str:
    lines = [f"  {k:<16} {gib(v):>12}" for k, v in plan.items()]
    total = sum(plan.values())
    lines.append(f"  {'total':<16} {gib(total):>12}")
    if capacity is not None:
        verdict = "fits" if total <= capacity else "does NOT fit"
        lines.append(f"  {verdict} in {gib(capacity)} ({100 * total / capacity:.0f}%)")
    return "\n".join(lines)


def stage_plan(cfg, st, shape: Shape, world: int, *, strategy: str | None = None, zero_stage: int | None = None,
               activation_checkpointing: bool | None = None, cuda: bool = True) -> dict[str, int]:
    """The plan of learning stage `st` of config `cfg` on `world` devices (the config's strategy unless given)."""
    w = cfg.workers
    n, m = cfg.stage_pattern(st)
    return memory_plan(
        shape, n=n, m=m, micro_batch=max(st.batch_size // world, 1), seqlen=st.seqlen,
        strategy=strategy or w.strategy, world=world,
        zero_stage=zero_stage or w.zero_stage,
        activation_checkpointing=w.activation_checkpointing if activation_checkpointing is None
        else activation_checkpointing,
        logits_per_group=st.logits_per_group, logits_dtype=st.logits_dtype, model_dtype=cfg.model.dtype, cuda=cuda,
        shard_group=w.shard_group)


def plan_report(cfg, st, shape: Shape, world: int, capacity: int | None, cuda: bool = True) -> str:
    """The configured strategy's plan item by item, then every strategy's total side by side."""
    n, m = cfg.stage_pattern(st)
    w = cfg.workers
    head = (f"{cfg.model.name_or_path}: {count(shape.params)} parameters, {count(shape.masked)} under "
            f"{n}:{m} masks ({st.logits_per_group}, {st.logits_dtype}); stage {st.name!r}: "
            f"{max(st.batch_size // world, 1)} x {st.seqlen} tokens per device and micro-batch, {world} device(s)")
    strategy = w.strategy if w.strategy != "none" or world == 1 else "ddp"
    label = f"{strategy}{f' ZeRO-{w.zero_stage}' if strategy == 'deepspeed' else ''}" + \
        (f", sharded in groups of {w.shard_group}" if strategy == "fsdp" and w.shard_group else "") + \
        (", activation checkpointing" if w.activation_checkpointing else "")
    lines = [head, f"per device, {label}:",
             format_plan(stage_plan(cfg, st, shape, world, strategy=strategy, cuda=cuda), capacity), "",
             "every strategy (total per device; ac = activation checkpointing):"]
    for name, stage in (("ddp", None), ("fsdp", None), ("deepspeed", 2), ("deepspeed", 3)):
        totals = []
        for ac in (False, True):
            total = sum(stage_plan(cfg, st, shape, world, strategy=name, zero_stage=stage,
                                   activation_checkpointing=ac, cuda=cuda).values())
            fits = "" if capacity is None else (" fits" if total <= capacity else " too big")
            totals.append(f"{'ac' if ac else 'no ac'} {gib(total)}{fits}")
        label = name if stage is None else f"ZeRO-{stage}"
        lines.append(f"  {label:<8} " + " | ".join(totals))
    return "\n".join(lines)


def what_fits(cfg, st, shape: Shape, world: int, capacity: int, cuda: bool = True) -> list[str]:
    """When the configured stage does not fit `capacity`, the changes that make it fit, one per line
    with the total per device: each single change of the recipe (a smaller micro-batch through
    grad_accum, activation checkpointing, leaner mask state, a sharded strategy), their combination,
    and the fewest devices that hold the configured recipe."""
    def total(c, s, n=world) -> int:
        return sum(stage_plan(c, s, shape, n, cuda=cuda).values())

    w = cfg.workers
    options: list[tuple[str, object, object]] = []
    if st.batch_size // world > 1:
        accum = st.batch_size // world
        options.append((f"grad_accum: {st.grad_accum * accum}, batch_size: {st.batch_size // accum} "
                        f"(micro-batch 1, same global batch)", cfg,
                        st.model_copy(update={"batch_size": st.batch_size // accum, "grad_accum": st.grad_accum * accum})))
    if not w.activation_checkpointing:
        options.append(("workers.activation_checkpointing: true",
                        cfg.model_copy(update={"workers": w.model_copy(update={"activation_checkpointing": True})}), st))
    if st.logits_per_group != "positions":
        options.append(("logits_per_group: positions", cfg, st.model_copy(update={"logits_per_group": "positions"})))
    if st.logits_dtype != "bfloat16":
        options.append(("logits_dtype: bfloat16", cfg, st.model_copy(update={"logits_dtype": "bfloat16"})))
    if world > 1 and w.strategy in ("none", "ddp"):
        options.append(("workers.strategy: fsdp",
                        cfg.model_copy(update={"workers": w.model_copy(update={"strategy": "fsdp"})}), st))
    lines = []
    for what, c, s in options:
        t = total(c, s)
        lines.append(f"  {what}: {gib(t)} per device{' (fits)' if t <= capacity else ''}")
    if len(options) > 1:
        c, s = cfg, st
        for _, oc, os_ in options:  # every change at once
            c = c.model_copy(update={"workers": c.workers.model_copy(update={
                k: getattr(oc.workers, k) for k in ("activation_checkpointing", "strategy")
                if getattr(oc.workers, k) != getattr(w, k)})})
            s = s.model_copy(update={k: getattr(os_, k) for k in ("batch_size", "grad_accum", "logits_per_group",
                                                                   "logits_dtype") if getattr(os_, k) != getattr(st, k)})
        t = total(c, s)
        lines.append(f"  all of these: {gib(t)} per device{' (fits)' if t <= capacity else ''}")
    for n in (2, 4, 8, 16, 32, 64, 128, 256):
        if n > world and st.batch_size % n == 0:
            sharded = cfg if w.strategy in ("fsdp", "deepspeed") else cfg.model_copy(
                update={"workers": w.model_copy(update={"strategy": "fsdp"})})
            t = total(sharded, st, n)
            if t <= capacity:
                lines.append(f"  {n} devices ({sharded.workers.strategy}, batch_size {st.batch_size} splits "
                             f"evenly): {gib(t)} per device (fits)")
                break
    return lines
