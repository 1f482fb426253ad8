"""maskpipe's library: configs, models, data streams, sparsity, evaluation and mask artifacts.

Plain PyTorch and transformers; nothing here imports Ray, so every stage is a function.
"""

__version__ = "0.1.0"


class MaskpipeError(Exception):
    """An error the user can act on: the CLI prints its message and exits non-zero, no traceback."""
