"""maskpipe's library: plain PyTorch and transformers, never Ray, so every stage is a function.

Folders by concern, each importing only those listed before it (`tests/test_layout.py` checks):

    core/       vocab, config building blocks, what a model is (loading, linears, fingerprint)
    train/      the one training loop, checkpoints, sharding strategies, memory plans
    eval/       perplexity, retrieval, zero-shot tasks
    nm/         N:M masks: primitives, encoding, one-shot methods, MaskLLM
    attention/  attention masks: static per-head plans and their gates
    io/         corpora, artifacts, interop formats, run directories, loggers, the model session
    stages/     one file per stage kind (its config and its body), and their registry
    config.py   the run-level schema, whose `Stage` union comes from the registry
    run/        ordering a run's stages, checks, results and their tables, tune, publish
"""

__version__ = "0.1.0"


class MaskpipeError(Exception):
    """An error the user can act on: the CLI prints its message and exits non-zero, no traceback."""
