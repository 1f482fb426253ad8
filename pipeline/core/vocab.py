"""maskpipe's vocabulary, each word defined once: the N:M `Pattern`, the names a config may use (one-shot
methods, training strategies, dtypes), and the rules that relate them (which strategy runs on how many
workers, how a batch splits over them).

Plain Python (no torch, no pydantic), so that the config schema, the artifact format, the library and the
command line all import it: the configs build their `Literal`s from these tuples, `jobs/commands` their
`choices`, `pipeline.run.publish` the card's baseline rows.
"""

from __future__ import annotations

from dataclasses import dataclass

# One-shot methods (`pipeline.nm.oneshot`). A refiner starts from an earlier stage's mask (`mask_from`), so it
# is no baseline of its own and the quick `maskpipe oneshot` command (no earlier stage) does not offer it.
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot", "dsnot-exact")
REFINING_METHODS = ("dsnot", "dsnot-exact")
STANDALONE_METHODS = tuple(m for m in ONESHOT_METHODS if m not in REFINING_METHODS)
LEARNED_METHOD = "maskllm"  # the method name a learn stage's artifact and results record

# How a learning stage spreads the model and the mask state over its workers (`pipeline.train.shard`).
STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")
SHARDING_STRATEGIES = ("fsdp", "deepspeed")  # these need a process group, i.e. Ray workers

RETRIEVAL_TASKS = ("passkey", "niah", "multikey")  # a retrieval stage's tasks, in the order tables show them
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what a model loads in (`pipeline.core.models.DTYPES`)
SAMPLE_BY = ("line", "paragraph", "document")  # records of a local text file (`pipeline.io.data`)


@dataclass(frozen=True)
class Pattern:
    """N:M sparsity: keep N of every M consecutive weights along a linear's input dimension, 0 < N < M.

    Written "N:M" in configs, on the command line and in an artifact's manifest (`str(pattern)`); read
    back with `Pattern.parse`. Unpacks as `n, m = pattern`."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f'expected "N:M" with 0<N<M, got "{self.n}:{self.m}"')

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """ "2:4" -> Pattern(2, 4); a ValueError that quotes `text` for anything else."""
        if isinstance(text, Pattern):
            return text
        try:
            n, m = (int(x) for x in str(text).split(":"))
            return cls(n, m)
        except ValueError:
            raise ValueError(f'expected "N:M" with 0<N<M, got "{text}"') from None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def __iter__(self):
        return iter((self.n, self.m))


def check_batch_split(batch_size: int, workers: int) -> int:
    """The blocks each of `workers` data-parallel workers takes of a batch; a ValueError (the caller adds
    where the numbers come from) if they do not split evenly."""
    workers = max(workers, 1)
    if batch_size % workers:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {workers} workers")
    return batch_size // workers


def strategy_problem(strategy: str, workers: int, shard_group: int | None = None,
                     distributed: bool | None = None) -> tuple[str, str] | None:
    """What keeps `strategy` from running on `workers` workers, as (the `workers.` key at fault, why), or
    None. `distributed`: whether there is a process group (default: whether there are Ray workers)."""
    if strategy not in STRATEGIES:
        return "strategy", f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}"
    if strategy in SHARDING_STRATEGIES and not (workers > 0 if distributed is None else distributed):
        return "strategy", f"{strategy} runs on Ray workers: set workers.num_workers ≥ 1"
    if shard_group is not None and (strategy != "fsdp" or workers % shard_group):
        return "shard_group", (f"hybrid sharding needs strategy fsdp and a number of workers that is a multiple "
                               f"of {shard_group}")
    if strategy == "none" and workers > 1:
        return "strategy", f"none runs one worker, not {workers}: use ddp, fsdp or deepspeed"
    return None
