"""Streamed corpora: local files or hub datasets, mixed, shuffled, tokenized, packed into fixed-length
blocks and dealt out to ranks, with exact resume.

Nothing is materialised: memory is the shuffle buffer plus the packing buffer, whatever the corpus size.
"""

from __future__ import annotations

import glob
import itertools
import os

import datasets
import torch
from datasets.exceptions import DatasetNotFoundError

from pipeline import MaskpipeError
from pipeline.config import DataConfig, Source

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TEXT = datasets.Features({"text": datasets.Value("string")})


def _label(src: Source) -> str:
    return src.path if src.name is None else f"{src.path} ({src.name})"


def _local_files(src: Source) -> list[str] | None:
    """The files a local source names, or None for a hub id."""
    path = os.path.expanduser(src.path)
    files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
    if files:
        return files
    # A hub id has no file suffix, glob characters or path prefix; anything else is a mistyped file.
    if glob.has_magic(path) or os.path.splitext(path)[1] in _BUILDERS or path.startswith(("/", ".")):
        raise MaskpipeError(f"data source {src.path!r}: no files match")
    return None


def _load_source(src: Source) -> datasets.IterableDataset:
    """One source as a stream of {"text": str}, in file order."""
    files = _local_files(src)
    if files is None:
        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision, streaming=True)
        except DatasetNotFoundError as e:
            raise MaskpipeError(f"data source {_label(src)!r}: no local file and no hub dataset: {e}") from None
    else:
        builders = {_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
        if None in builders or len(builders) > 1:
            raise MaskpipeError(
                f"data source {src.path!r}: expected files of one kind among {sorted(_BUILDERS)}, got {files[:5]}"
            )
        builder = builders.pop()
        kwargs = {"sample_by": src.sample_by} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)

    field = src.text_field
    if ds.features is not None and field not in ds.features:
        raise MaskpipeError(f"data source {_label(src)!r}: no text field {field!r} (fields: {sorted(ds.features)})")

    def pick(record: dict) -> dict:
        # json fills a field that a record lacks with None, so None counts as missing too.
        if record.get(field) is None:
            raise MaskpipeError(
                f"data source {_label(src)!r}: a record has no text field {field!r}: {str(record)[:200]}"
            )
        return {"text": record[field]}

    # Declared features let interleave_datasets skip reading each source's head to infer them.
    return ds.map(pick, features=_TEXT).select_columns(["text"])


def open_corpus(data: DataConfig, seed: int = 0) -> datasets.IterableDataset:
    """The mixed (and shuffled, if configured) stream of {"text": str}."""
    weights = data.weights or [1.0] * len(data.sources)
    # A zero-weight source is never drawn, so "all_exhausted" would never end the epoch: drop it.
    mixed = [(_load_source(s), w) for s, w in zip(data.sources, weights) if w > 0]
    if len(mixed) == 1:
        ds = mixed[0][0]
    else:
        total = sum(w for _, w in mixed)
        ds = datasets.interleave_datasets(
            [d for d, _ in mixed],
            probabilities=[w / total for _, w in mixed],
            seed=seed,
            stopping_strategy="all_exhausted",
        )
    if data.shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=data.shuffle_buffer)
    return ds


class TokenStream:
    """Fixed-length token blocks from a streamed corpus, dealt out to ranks, exactly resumable.

    Records are tokenized without special tokens, each followed by EOS (when the tokenizer has one) as
    a document separator, and packed back to back: a block may span records, and no token is padded
    or dropped. The stream cycles epochs forever, each reshuffled deterministically by `set_epoch`.

    Ranks share one global sequence of blocks and rank r takes blocks r, r + W, r + 2W, ... So the
    blocks of a global batch are the same whatever the number of workers W: data-parallel learning
    matches one process, and a run can resume on another number of workers. The price is that every
    rank tokenizes the whole stream, which is small beside a forward and backward pass of the model.

    Resume is by replay: the state is (epoch, raw records consumed this epoch, leftover packing
    buffer), the same on every rank between two `next` calls, and loading it rebuilds the epoch's
    stream and discards that many records untokenized. `datasets`' own state_dict can't be used for
    this: it drops the shuffle buffer's contents. Replay only relies on the stream being a
    deterministic function of (seed, epoch), at the cost of re-reading the epoch up to the resume point.
    """

    def __init__(self, data: DataConfig, tokenizer, seqlen: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MaskpipeError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokenizer, self.seqlen = tokenizer, seqlen
        self._eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.rank, self.world_size = rank, world_size
        self._ds = open_corpus(data, seed)
        # Rank and world size are not part of it: the state is global, so any rank of any world size resumes it.
        self._fingerprint = {"seqlen": seqlen, "seed": seed, "data": data.model_dump(mode="json")}
        self._where = f"corpus {[s.path for s in data.sources]}"
        self._buffer: list[int] = []
        self._start_epoch(0)

    def _start_epoch(self, epoch: int, skip: int = 0) -> None:
        self._ds.set_epoch(epoch)
        self._records = iter(self._ds)
        skipped = sum(1 for _ in itertools.islice(self._records, skip))
        if skipped < skip:
            raise MaskpipeError(
                f"{self._where}: the state resumes after record {skip} of epoch {epoch}, "
                f"but the epoch has only {skipped}; the corpus changed since the state was saved"
            )
        self._epoch, self._consumed = epoch, skip
        self._resumed_at, self._epoch_tokens = skip, 0

    def _fill(self) -> None:
        while len(self._buffer) < self.seqlen:
            record = next(self._records, None)
            if record is None:
                # A whole epoch read from its start without a single token: nothing will ever come; with
                # fewer tokens than a block, every block would repeat the corpus.
                if self._resumed_at == 0 and self._epoch_tokens == 0:
                    raise MaskpipeError(f"{self._where}: empty corpus, no record has any text")
                if self._resumed_at == 0 and self._epoch_tokens < self.seqlen:
                    raise MaskpipeError(f"{self._where}: the corpus has {self._epoch_tokens} tokens, fewer than one "
                                        f"block of {self.seqlen} (seqlen)")
                self._start_epoch(self._epoch + 1)
                continue
            self._consumed += 1
            text = record["text"]
            if not text.strip():
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self._eos
            self._buffer += ids
            self._epoch_tokens += len(ids)

    def __iter__(self):
        return self

    def _block(self) -> list[int]:
        self._fill()
        block, self._buffer = self._buffer[: self.seqlen], self._buffer[self.seqlen :]
        return block

    def __next__(self) -> torch.Tensor:
        for _ in range(self.rank):
            self._block()
        block = self._block()
        for _ in range(self.world_size - 1 - self.rank):
            self._block()
        return torch.tensor(block, dtype=torch.long)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.stack([next(self) for _ in range(batch_size)])

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "records": self._consumed,
            "buffer": list(self._buffer),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("fingerprint", {})
        diffs = [
            f"{k}: saved {saved.get(k)!r}, this stream {v!r}" for k, v in self._fingerprint.items() if saved.get(k) != v
        ]
        if diffs:
            raise MaskpipeError(f"{self._where}: the state is from a different stream; " + "; ".join(diffs))
        self._start_epoch(state["epoch"], skip=state["records"])
        self._buffer = list(state["buffer"])


def calibration_blocks(data: DataConfig, tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The first `n_samples` blocks of a single-rank TokenStream: [n_samples, seqlen]."""
    return TokenStream(data, tokenizer, seqlen, seed=seed).next_batch(n_samples)


def eval_text(data: DataConfig) -> str:
    """Every record of every source, in order, unshuffled and once, joined with "\\n\\n" (the
    wikitext-2 perplexity protocol keeps empty records too)."""
    text = "\n\n".join(r["text"] for src in data.sources for r in _load_source(src))
    if not text.strip():
        raise MaskpipeError(f"corpus {[s.path for s in data.sources]}: empty corpus, no record has any text")
    return text
