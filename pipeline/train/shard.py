"""How the mask state is spread over data-parallel ranks: `none`, `ddp`, `fsdp` or `deepspeed`.

MaskLLM's state is the logits and their Adam moments, about 24 bytes per masked weight at 2:4 against 2
for the frozen bf16 weight, so the logits and the optimizer state are what a large model must shard:

  none / ddp  every rank holds the whole model, the logits and AdamW; DDP averages the gradients
  fsdp        PyTorch FSDP2 (`fully_shard` per decoder block, then the root): frozen weights, logits and
              AdamW state are sharded by rows and gathered one block at a time; with `shard_group` G,
              hybrid sharding: sharded within each group of G ranks (a node), replicated across groups
  deepspeed   DeepSpeed ZeRO stage 2 (gradients and optimizer state sharded) or 3 (parameters too)

A model loaded on the meta device (`pipeline.core.models.load_model(meta=True)`, `workers.sharded_load`) is
filled after sharding: under fsdp each rank reads only the rows of each frozen weight that it owns
and makes only its rows of the initial logits, so no rank ever holds the whole model; the other
strategies, which keep whole copies, read it whole.

Whatever the strategy, rank r of W *owns* rows chunk r of every logits tensor, as `torch.chunk` would
cut them (FSDP2's own row shards; under hybrid sharding, chunk r mod G of G, saved by the first group),
and saves exactly those rows (`pipeline.train.checkpoint`). So a
checkpoint never depends on the strategy or the number of ranks that wrote it: a run resumes on another
world size, or switches strategy, by reading the rows it now owns.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.train.checkpoint import Checkpoint, rank_world
from maskpipe.pipeline.core.models import decoder_blocks, materialize, pending
from maskpipe.pipeline.core.vocab import strategy_problem
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count


def adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `params`, torch's fused kernel where it has one (floating tensors on the CPU or CUDA,
    FSDP2's DTensors included): one pass per tensor instead of a dozen. On 28M logits at one CPU thread
    a step took 31 ms fused, 136 ms in torch's default (docs/RESULTS.md, step cost). Same update within
    float32 rounding; the moments and step count are the same state, so checkpoints do not change."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused = all(p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def owned_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of an n-row tensor that `rank` owns: `torch.chunk`'s split, as FSDP2 shards."""
    size = math.ceil(n / world)
    start = min(rank * size, n)
    return start, min(start + size, n)


class Strategy:
    """The plain data-parallel strategy (`none` on one rank, `ddp` on several); the sharded ones
    override how parameters are wrapped, read and written."""

    def __init__(self, model: nn.Module, masks: dict[str, nn.Module], *, lr: float, weight_decay: float,
                 grad_clip: float | None, micro_batch: int, grad_accum: int, zero_stage: int = 3,
                 shard_group: int | None = None):
        self.rank, self.world = rank_world()
        # Rows are owned within groups of `group` ranks: the whole world, unless hybrid sharding
        # replicates the state across groups. Only the first group writes them.
        self.group = shard_group or self.world
        self.group_rank, self.writes = self.rank % self.group, self.rank < self.group
        self.masks, self.grad_clip = masks, grad_clip
        self.forward, self.optimizer = self._setup(model, lr, weight_decay, micro_batch, grad_accum, zero_stage)

    def _adamw(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        return adamw([self.params[k] for k in sorted(self.params)], lr, weight_decay)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """Each mask's logits, as the strategy holds them now (FSDP2 swaps in sharded parameters)."""
        return {k: mod.logits for k, mod in self.masks.items()}

    def _setup(self, model, lr, weight_decay, micro_batch, grad_accum, zero_stage):
        """(the module to call forward on, the optimizer of the logits)."""
        return DistributedDataParallel(model) if self.world > 1 else model, self._adamw(lr, weight_decay)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self, last_micro: bool):
        """A context for one micro-batch's forward and backward: gradients are averaged over ranks on
        the last micro-batch of a step only."""
        return contextlib.nullcontext() if last_micro or self.world == 1 else self.forward.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.grad_clip)
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Mask state allocated on this rank: logits, their gradients and AdamW's moments."""
        def local(t):
            return t.to_local() if hasattr(t, "to_local") else t

        total = 0
        for p in self.params.values():
            states = [v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()]
            total += sum(local(t).numel() * t.element_size() for t in [p, p, *states])  # p twice: its gradient
        return total

    # The rows this rank owns, and writing them back. `what` is "logits" or an AdamW moment.
    def _full(self, name: str, what: str) -> torch.Tensor:
        p = self.params[name]
        return p if what == "logits" else self.optimizer.state[p][what]

    def owned(self, name: str, what: str = "logits") -> torch.Tensor:
        start, stop = self.rows(name)
        return self._full(name, what).detach()[start:stop]

    def full_logits(self) -> dict[str, torch.Tensor]:
        """Every logits tensor whole, on every rank (a collective for the sharded strategies)."""
        return {k: p.detach().cpu() for k, p in self.params.items()}

    def rows(self, name: str) -> tuple[int, int]:
        p = self.params[name]
        return owned_rows(getattr(p, "ds_shape", p.shape)[0], self.group_rank, self.group)  # ZeRO-3: shape [0]

    @torch.no_grad()
    def load(self, ckpt: Checkpoint) -> None:
        """Logits and AdamW state from a checkpoint written with any strategy and world size."""
        fused = any(g.get("fused") for g in self.optimizer.param_groups)  # a fused step count lives on p's device
        for name, p in self.params.items():
            step = torch.tensor(float(ckpt.step), dtype=torch.float32, device=p.device if fused else "cpu")
            self.optimizer.state[p] = {"step": step, **{w: torch.zeros_like(p) for w in MOMENTS}}
            for what in ("logits", *MOMENTS):
                self._load(name, what, ckpt)

    def _load(self, name: str, what: str, ckpt: Checkpoint) -> None:
        self._full(name, what).copy_(ckpt.read(f"{what}.{name}"))


class FSDP(Strategy):
    """FSDP2: each decoder block is a unit that all-gathers its frozen weights and logits for its
    forward and backward and frees them after; gradients are reduce-scattered to the owning rows.
    Per-parameter sharding lets a unit mix frozen weights and trainable logits (FSDP1 could not)."""

    def _setup(self, model, lr, weight_decay, micro_batch, grad_accum, zero_stage):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if self.group < self.world:  # hybrid: shard within each group of ranks, replicate across groups
            device = next(iter(self.params.values())).device.type
            mesh = init_device_mesh(device, (self.world // self.group, self.group),
                                    mesh_dim_names=("replicate", "shard"))
        todo = pending(model)  # deferred parameters (a model loaded on meta), before FSDP swaps them
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self._materialize(todo)
        for name, p in self.params.items():
            start, stop = self.rows(name)
            if p.to_local().shape[0] != stop - start:
                raise MaskpipeError(f"{name}: FSDP's row shard is not torch.chunk's; maskpipe's checkpoints assume it")
        return model, self._adamw(lr, weight_decay)  # over the sharded parameters fully_shard put in place

    @torch.no_grad()
    def _materialize(self, todo) -> None:
        """Give every deferred parameter its rows: each rank reads (or, for the logits, keeps) only the
        rows it owns, so no rank ever holds the whole model. The frozen weights stay in the model's
        dtype (bf16 for a bf16 load) beside fp32 logits: FSDP2 all-gathers mixed dtypes as bytes."""
        from torch.distributed.tensor import DTensor

        for d, holders in todo:
            p = getattr(*holders[0])  # FSDP's sharded DTensor, its local rows still on meta
            start, stop = owned_rows(p.shape[0], self.group_rank, self.group)
            if p.to_local().shape[0] != stop - start:
                raise MaskpipeError(f"{holders[0][1]}: FSDP's row shard is not torch.chunk's; cannot read it in slices")
            local = d.rows(start, stop).to(device=d.device, dtype=p.dtype).contiguous()
            if local.untyped_storage().nbytes() > local.nbytes:  # rows of a whole tensor: keep only them
                local = local.clone()
            new = nn.Parameter(DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride()), requires_grad=p.requires_grad)
            for module, name in holders:
                setattr(module, name, new)

    def sync(self, last_micro: bool):
        self.forward.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def owned(self, name: str, what: str = "logits") -> torch.Tensor:
        return self._full(name, what).detach().to_local()

    def full_logits(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().full_tensor().cpu() for k, p in self.params.items()}

    def _load(self, name: str, what: str, ckpt: Checkpoint) -> None:
        self._full(name, what).to_local().copy_(ckpt.read(f"{what}.{name}", *self.rows(name)))


def _deepspeed():
    """deepspeed, an optional dependency (`pip install 'maskpipe[deepspeed]'`) that only this strategy imports."""
    try:
        import deepspeed
    except ImportError:
        raise MaskpipeError("workers.strategy: deepspeed: the deepspeed package is not installed "
                            "(pip install 'maskpipe[deepspeed]')") from None
    return deepspeed


def require_deepspeed(strategy: str) -> None:
    """Refuse `workers.strategy: deepspeed` before a run starts when deepspeed is not installed."""
    import importlib.util

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:  # None: not installed
        _deepspeed()


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO stage 2 or 3 through `deepspeed.initialize`. ZeRO fixes what trains at
    initialization (the logits already exist with requires_grad) and, at stage 3, partitions every
    parameter into flat shards, so parameters are read and written through DeepSpeed's own
    `safe_get_full_*`/`safe_set_full_*` (collectives at stage 3), never through `.data`."""

    def _setup(self, model, lr, weight_decay, micro_batch, grad_accum, zero_stage):
        deepspeed = _deepspeed()

        self.zero_stage = zero_stage
        bf16 = next(iter(self.params.values())).device.type == "cuda"
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": self.grad_clip or 0.0,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,  # plain torch AdamW: fused DeepSpeed Adam needs a build
            "steps_per_print": 1 << 30,
        }
        # The optimizer is ZeRO's wrapper around this AdamW; its param_groups are AdamW's.
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self._adamw(lr, weight_decay),
                                                       config=config)
        return engine, optimizer

    def sync(self, last_micro: bool):
        return contextlib.nullcontext()  # the engine counts micro-batches itself

    def backward(self, loss: torch.Tensor) -> None:
        self.forward.backward(loss, scale_wrt_gas=False)  # the caller already divided by grad_accum
        self.forward.step()  # an optimizer step only at the accumulation boundary

    def step(self) -> None:
        pass  # done by the last micro-batch's backward

    def _full(self, name: str, what: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        p = self.params[name]
        return safe_get_full_fp32_param(p) if what == "logits" else safe_get_full_optimizer_state(p, what)

    def full_logits(self) -> dict[str, torch.Tensor]:
        return {k: self._full(k, "logits").cpu() for k in sorted(self.params)}

    def state_bytes(self) -> int:
        # ZeRO keeps the parameter (partitioned at stage 3) and a partition of an fp32 master copy,
        # fp32 gradients and fp32 moments.
        return sum(p.ds_tensor.numel() * (p.element_size() + 16) if hasattr(p, "ds_tensor")
                   else p.numel() * p.element_size() + p.numel() * 16 // self.world for p in self.params.values())

    @torch.no_grad()
    def load(self, ckpt: Checkpoint) -> None:
        deepspeed = _deepspeed()
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        # ZeRO creates AdamW's state at the first step; a resumed run needs it now, with the step
        # count that AdamW's bias correction reads.
        zero = self.optimizer
        flats = zero.fp32_partitioned_groups_flat if self.zero_stage == 3 else zero.single_partition_of_fp32_groups
        for flat in flats:
            zero.optimizer.state[flat] = {"step": torch.tensor(float(ckpt.step)),
                                          **{w: torch.zeros_like(flat) for w in MOMENTS}}
        for name in sorted(self.params):
            p = self.params[name]
            full = ckpt.read(f"logits.{name}").to(p.device)
            safe_set_full_fp32_param(p, full)  # the optimizer's master copy; the forward reads the parameter:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(full)
            for what in MOMENTS:
                safe_set_full_optimizer_state(p, ckpt.read(f"{what}.{name}").to(p.device), what)


def make_strategy(name: str, model: nn.Module, masks: dict[str, nn.Module], **kw) -> Strategy:
    """`masks`: name -> the module whose `logits` parameter trains."""
    _, world = rank_world()
    problem = strategy_problem(name, world, kw.get("shard_group") or None, torch.distributed.is_initialized())
    if problem is not None:
        raise MaskpipeError(f"workers.{problem[0]}: {problem[1]}")
    if name != "fsdp":
        materialize(model)  # a model loaded on meta is read whole where the strategy does not shard it
    return {"fsdp": FSDP, "deepspeed": DeepSpeed}.get(name, Strategy)(model, masks, **kw)
