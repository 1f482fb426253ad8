"""What a command reads from the Hugging Face Hub when given a repo id instead of a local path: a
published mask artifact (`--masks ORG/NAME`), a MaskLLM mask or a DuoAttention plan (`maskpipe import`).

A reference is a local path when one exists, else `OWNER/NAME` or `OWNER/NAME@REVISION` (a branch, tag
or commit), fetched with huggingface_hub into its cache (`HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the
cache alone). Every failure is one MaskpipeError naming the reference: offline and not cached, no such
repo, revision or file, no connection.
"""

from __future__ import annotations

import re
from pathlib import Path

from maskpipe.pipeline import MaskpipeError

REPO_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

ARTIFACT_FILES = ["manifest.json", "masks.safetensors", "logits.safetensors"]  # what `publish` puts in a repo
MASKLLM_FILE = "mask_compressed.npz"
DUO_FILES = ["full_attention_heads.tsv", "config.json"]


def hub_ref(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `ref` names a Hub repo rather than an existing local path, else None."""
    if Path(ref).exists() or ref.startswith((".", "/", "~")):
        return None
    m = REPO_ID.match(ref)
    return (m["repo"], m["revision"]) if m else None


def _fail(ref: str, what: str, e: Exception) -> MaskpipeError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    # LocalEntryNotFoundError (not in the cache, and the Hub not asked) subclasses EntryNotFoundError
    if isinstance(e, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        why = (f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
               if constants.HF_HUB_OFFLINE else "cannot reach the Hub and it is not in the local cache")
    elif isinstance(e, RevisionNotFoundError):
        why = "no such revision"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such model repo on the Hub (or it is private: log in or set HF_TOKEN)"
    elif isinstance(e, EntryNotFoundError):
        why = f"the repo holds no {what}"
    else:
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return MaskpipeError(f"{ref}: cannot download the {what} from the Hugging Face Hub: {why}")


def fetch_file(ref: str, filename: str, what: str) -> Path:
    """`ref` itself if it is a local path, else `filename` of the Hub repo it names (from the cache when there)."""
    hub = hub_ref(ref)
    if hub is None:
        return Path(ref)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub[0], filename, revision=hub[1]))
    except Exception as e:  # huggingface_hub and requests raise many kinds; each is one line for the user
        raise _fail(ref, what, e) from None


def fetch_dir(ref: str, patterns: list[str], what: str) -> Path:
    """`ref` itself if it is a local path, else a snapshot of the files matching `patterns` of the Hub
    repo it names (a folder in the cache)."""
    hub = hub_ref(ref)
    if hub is None:
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub[0], revision=hub[1], allow_patterns=patterns))
    except Exception as e:
        raise _fail(ref, what, e) from None
    if not any((folder / p).is_file() for p in patterns if "*" not in p):
        raise MaskpipeError(f"{ref}: cannot download the {what} from the Hugging Face Hub: the repo holds no "
                            f"{' or '.join(patterns)}")
    return folder


def fetch_artifact(ref: str) -> Path:
    """A mask artifact: a local directory, or a repo `maskpipe publish --push` wrote."""
    return fetch_dir(ref, ARTIFACT_FILES, "mask artifact")


def artifact_name(ref: str) -> str:
    """The name a variant takes from `ref`: the folder's, or the repo's (not the cache's commit folder)."""
    hub = hub_ref(ref)
    return hub[0].split("/")[-1] if hub else Path(ref).name
