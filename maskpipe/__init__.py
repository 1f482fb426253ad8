"""maskpipe: learn sparsity masks (N:M, per-head attention) over frozen LLM weights, on Ray clusters.

One import namespace over the repository's folders (each subpackage here is a link to the folder of
the same name at the repository root, which keeps the layout the design names):

- `maskpipe.pipeline`: the library (configs, models, data streams, sparsity, evaluation, artifacts);
  plain PyTorch and transformers, never Ray.
- `maskpipe.workers`: Ray Train worker loops and Ray actors that run one stage on a group of devices.
- `maskpipe.jobs`: the `maskpipe` command line and job entrypoints.
- `maskpipe.cluster`: how to get a Ray cluster (local, VM launcher, KubeRay).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("maskpipe")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
