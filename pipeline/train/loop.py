"""The one training loop of everything maskpipe learns over a frozen model: N:M mask logits
(`pipeline.nm.learn`) and attention gates (`pipeline.attention.plans`).

The loop owns what every learning method repeats: resuming from a checkpoint (the step, the log
history, the loss window and the data stream's position), the cosine lr schedule with warmup, the
loss window that a log entry averages, the log and checkpoint cadence, and the progress bar. A method
supplies the rest as a `Method`: what one optimizer step does (its parameters, its loss, its own
per-step schedules), what it adds to a log entry, and what a checkpoint holds besides the common state.

Checkpoints go through a store (`pipeline.train.checkpoint`): `save(step, tensors, meta)` on every rank and
`latest()`. The meta of every checkpoint holds `stream`, `history`, `loss_window` and `threads`, and
whatever the method adds (`Method.state`); the step is the store's own.

Exact resume: a resumed run computes with the number of torch threads that wrote its checkpoint. CPU
kernels split their reductions by thread count, so the same steps on 1 and 2 threads differ in the last
bits (micro-llama: 99% of the logits after 30 steps, by up to 4e-4), and a resume in a process with
another count (a new Ray job, whose workers get one thread per CPU; another OMP_NUM_THREADS) would
continue a run it did not start.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from maskpipe.pipeline.train.checkpoint import Checkpoint

log = logging.getLogger("maskpipe")


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    return start + (end - start) * min(step / max(total - 1, 1), 1.0)


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Settings(Protocol):
    """The loop's settings: `pipeline.config.LoopSettings`, which every learning stage's config extends."""

    steps: int
    lr: float
    warmup_steps: int
    log_every: int
    checkpoint_every: int


class Method(Protocol):
    """What a learning method supplies to `train`."""

    desc: str  # the progress bar's label
    loss_key: str  # the name of the windowed loss in a log entry

    def load(self, ckpt: Checkpoint) -> None:
        """Restore the trained state (parameters, optimizer, the method's own meta) from `ckpt`."""

    def step(self, step: int, lr: float) -> float:
        """One optimizer step at `lr` (step counts from 0); returns its loss, the same on every rank."""

    def logged(self, lr: float) -> dict[str, Any]:
        """What a log entry holds besides the step and the windowed loss (the last step's schedules...)."""

    def state(self) -> tuple[dict, dict[str, Any]]:
        """(tensors, meta) of a checkpoint besides the common state; called on every rank."""


def train(method: Method, st: Settings, stream, store, on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Run `method` for `st.steps` optimizer steps, resuming from `store.latest()` if there is a
    checkpoint; returns the log history (every entry, the resumed ones included)."""
    step, history = 0, []
    window: list[float] = []  # losses since the last log: one batch's loss is too noisy to read
    with store.latest() as ckpt:
        if ckpt is not None:
            method.load(ckpt)
            stream.load_state_dict(ckpt.meta["stream"])
            step, history, window = ckpt.step, ckpt.meta["history"], ckpt.meta["loss_window"]
            threads = ckpt.meta.get("threads")  # absent in checkpoints of earlier versions
            if threads is not None and threads != torch.get_num_threads():
                log.info("resuming on %d torch threads, as the checkpoint was written (this process had %d): "
                         "the same arithmetic as an uninterrupted run", threads, torch.get_num_threads())
                torch.set_num_threads(threads)
            if on_log:
                on_log({"resumed_from_step": step})

    def checkpoint() -> None:
        tensors, meta = method.state()
        store.save(step, tensors, {"stream": stream.state_dict(), "history": history, "loss_window": window,
                                   "threads": torch.get_num_threads(), **meta})

    bar = tqdm(total=st.steps, initial=step, desc=method.desc, disable=None)
    try:
        while step < st.steps:
            lr = cosine_lr(st.lr, step, st.steps, st.warmup_steps)
            loss = method.step(step, lr)
            step += 1
            window.append(loss)
            bar.update(1)
            if step % st.log_every == 0 or step == st.steps:
                entry = {"step": step, method.loss_key: sum(window) / len(window), **method.logged(lr)}
                window = []
                history.append(entry)
                if on_log:
                    on_log(entry)
            if step % st.checkpoint_every == 0 or step == st.steps:
                checkpoint()
    finally:
        bar.close()
    return history
