"""Streamed corpora: local files or hub datasets, tokenized and packed into fixed-length blocks per
source, blended by token shares, shuffled by block and dealt out to ranks, with exact resume.

Nothing is materialised: memory is the record shuffle buffer, the packing buffers and one window of
shuffled blocks, whatever the corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os

import datasets
import torch
from datasets.exceptions import DatasetNotFoundError

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.schema import SHUFFLE_WINDOW_TOKENS, DataConfig, Source, where_relative

PIECE_CHARS = 1 << 16  # a record longer than this is tokenized in pieces of about this many characters
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
        raise MaskpipeError(f"data source {src.path!r}: no files match{where_relative(src.path)}")
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


def _utf8(records, where: str):
    """`records`, with a corpus that is not UTF-8 text (binary bytes anywhere in a file) as one line."""
    try:
        yield from records
    except UnicodeDecodeError as e:
        raise MaskpipeError(f"{where}: not UTF-8 text ({e.reason}: byte {e.object[e.start:e.start + 1]!r} at "
                            f"offset {e.start} of a block read from the file)") from None


def piece_end(text: str, start: int, limit: int = PIECE_CHARS) -> int:
    """Where the piece of a long record that starts at `start` ends: at most `limit` characters on,
    after the last whitespace of the piece when there is one in its second half. A record up to
    `limit` characters is one piece, so ordinary text tokenizes exactly as a whole."""
    end = start + limit
    if end >= len(text):
        return len(text)
    space = max(text.rfind(" ", start + limit // 2, end), text.rfind("\n", start + limit // 2, end))
    return space + 1 if space >= 0 else end


def open_source(src: Source, seed: int = 0, shuffle_buffer: int = 0) -> datasets.IterableDataset:
    """One source's records as a stream of {"text": str}, shuffled by record if `shuffle_buffer`."""
    ds = _load_source(src)
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds


class _SourceBlocks:
    """One source's records tokenized (no special tokens, each followed by `separator`: the EOS token
    or a text) and packed back to back into blocks of `seqlen` tokens: a block may span records, no
    token is padded or dropped. Cycles epochs forever, each reshuffled by `set_epoch`.

    State: (epoch, raw records consumed this epoch, leftover packing buffer). Loading it rebuilds the
    epoch's stream and discards that many records untokenized: replay relies only on the stream being a
    deterministic function of (seed, epoch). `datasets`' own state_dict can't be used: it drops the
    shuffle buffer's contents."""

    def __init__(self, ds: datasets.IterableDataset, tokenizer, seqlen: int, where: str, separator: str = "eos",
                 files: list[str] | None = None):
        self._ds, self.tokenizer, self.seqlen, self.where = ds, tokenizer, seqlen, where
        self._files = {f: os.path.getsize(f) for f in files or []}
        eos = separator == "eos"
        self._eos = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
        self._suffix = "" if eos else separator
        self._buffer: list[int] = []
        self._head = 0  # the buffer's tokens before this one are already in blocks (compacted now and then)
        self._text: str | None = None  # the record being tokenized piece by piece, and where its next piece starts
        self._offset = 0
        self._start_epoch(0)

    def _start_epoch(self, epoch: int, skip: int = 0, seed: str = "") -> None:
        self._ds.set_epoch(epoch)
        # over the text of every record read so far: this epoch's, after the digest of those before it
        self._seed, self._read = seed, hashlib.sha256(seed.encode())
        self._records = map(self._hashed, _utf8(iter(self._ds), self.where))
        skipped = sum(1 for _ in itertools.islice(self._records, skip))
        if skipped < skip:
            raise MaskpipeError(
                f"{self.where}: the state resumes after record {skip} of epoch {epoch}, "
                f"but the epoch has only {skipped}; the corpus changed since the state was saved"
            )
        self._epoch, self._consumed = epoch, skip
        self._resumed_at, self._epoch_tokens = skip, 0

    def _hashed(self, record: dict) -> dict:
        self._read.update(record["text"].encode("utf-8", "surrogatepass") + b"\x00")
        return record

    def next_block(self) -> list[int]:
        """The next block. Linear in the tokens read, however long a record: its pieces are tokenized
        only as blocks need them, and blocks are cut from the buffer at a moving head."""
        while len(self._buffer) - self._head < self.seqlen:
            if self._text is not None:
                self._tokenize_piece()
                continue
            record = next(self._records, None)
            if record is None:
                # A whole epoch read from its start without a single token: nothing will ever come; with
                # fewer tokens than a block, every block would repeat the corpus.
                if self._resumed_at == 0 and self._epoch_tokens == 0:
                    raise MaskpipeError(f"{self.where}: empty corpus, no record has any text")
                if self._resumed_at == 0 and self._epoch_tokens < self.seqlen:
                    raise MaskpipeError(f"{self.where}: the corpus has {self._epoch_tokens} tokens, fewer than one "
                                        f"block of {self.seqlen} (seqlen)")
                self._start_epoch(self._epoch + 1, seed=self._read.hexdigest())
                continue
            self._consumed += 1
            text = record["text"]
            if not text.strip():
                continue
            self._text, self._offset = text + self._suffix, 0
        block = self._buffer[self._head : self._head + self.seqlen]
        self._head += self.seqlen
        if self._head > len(self._buffer) // 2:
            del self._buffer[: self._head]
            self._head = 0
        return block

    def _tokenize_piece(self) -> None:
        """Tokenize the next piece of the current record into the buffer (EOS after its last piece)."""
        text, start = self._text, self._offset
        self._offset = piece_end(text, start)
        ids = self.tokenizer(text[start : self._offset], add_special_tokens=False)["input_ids"]
        if self._offset >= len(text):
            ids, self._text = ids + self._eos, None
        self._buffer += ids
        self._epoch_tokens += len(ids)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        """(epoch, records read, tokens not yet in a block, and where in the last record read its next
        piece starts, if it is not all tokenized yet)."""
        state = {"epoch": self._epoch, "records": self._consumed, "buffer": self._buffer[self._head :],
                 "files": self._files, "read_seed": self._seed, "read_sha256": self._read.hexdigest()}
        if self._text is not None:
            state["offset"] = self._offset
        return state

    def load_state_dict(self, state: dict) -> None:
        """Refuses a corpus that changed since the state was saved: a file's size, or the text of the
        records read before it (their sha256, recomputed as they are skipped)."""
        for f, size in (state.get("files") or {}).items():
            now = os.path.getsize(f) if os.path.isfile(f) else None
            if now != size:
                raise MaskpipeError(f"{self.where}: {f} changed since the checkpoint ("
                                    + (f"{size} -> {now} bytes" if now is not None else "it is gone")
                                    + "); resume with the corpus as it was, or start a new run")
        partial = state.get("offset") is not None
        self._start_epoch(state["epoch"], skip=state["records"] - partial, seed=state.get("read_seed", ""))
        self._buffer, self._head, self._text = list(state["buffer"]), 0, None
        if partial:
            record = next(self._records, None)
            if record is None:
                raise MaskpipeError(f"{self.where}: the state resumes inside record {state['records']} of epoch "
                                    f"{state['epoch']}, which is gone; the corpus changed since the state was saved")
            self._consumed += 1
            self._text, self._offset = record["text"] + self._suffix, state["offset"]
        if state.get("read_sha256") not in (None, self._read.hexdigest()):
            raise MaskpipeError(f"{self.where}: the {state['records']} records read before the checkpoint differ from "
                                "what was read then (the corpus changed since); resume with the corpus as it was, or "
                                "start a new run")


class TokenStream:
    """Fixed-length token blocks from a blend of streamed corpora, shuffled by block, dealt out to
    ranks, exactly resumable.

    Blending is by tokens: every source is packed into blocks on its own (`_SourceBlocks`), and block t
    of the blend comes from the source furthest below its share, i = argmax_i(share_i·(t+1) − taken_i),
    so after any number of blocks each source's share of the *tokens* is its weight up to one block
    (as Megatron, OLMo or nanotron read blend weights). A source that runs out starts its next epoch
    while the others go on: a small source is repeated to keep its share.

    Shuffling is by block: the blend is cut into windows of `shuffle_blocks` consecutive blocks and
    each window is emitted in a random order seeded by (seed, window). Without it a batch would be
    consecutive pieces of one or two documents, and a short run would read a handful of long documents
    from end to end. A window closes early once every source has begun a new epoch in it: a bigger one
    would only repeat blocks. `shuffle_buffer` additionally shuffles each source's records.

    Ranks share one global sequence of blocks and rank r takes blocks r, r + W, r + 2W, ... So the
    blocks of a global batch are the same whatever the number of workers W: data-parallel learning
    matches one process, and a run can resume on another number of workers. The price is that every
    rank tokenizes the whole stream, which is small beside a forward and backward pass of the model.

    State: the sources' states and blocks taken at the start of the current window, the window's
    index and the position in it, and the tokens emitted per source; the same on every rank between
    two `next` calls. Loading it replays the sources to the window's start and refills the window.
    """

    STATE_VERSION = 2

    def __init__(self, data: DataConfig, tokenizer, seqlen: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MaskpipeError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seqlen, self.seed = seqlen, seed
        self.rank, self.world_size = rank, world_size
        weights = data.weights or [1.0] * len(data.sources)
        # A zero-weight source is never drawn: don't even open it.
        picked = [(i, s, w) for i, (s, w) in enumerate(zip(data.sources, weights)) if w > 0]
        self.labels = [_label(s) for _, s, _ in picked]
        self._sources = [
            _SourceBlocks(open_source(s, (seed * 1_000_003 + i) % 2**32, data.shuffle_buffer), tokenizer, seqlen,
                          f"corpus {s.path!r}", data.separator, files=_local_files(s))
            for i, s, _ in picked
        ]
        total = sum(w for _, _, w in picked)
        self._shares = [w / total for _, _, w in picked]
        blocks = data.shuffle_blocks
        self._window_size = max(-(-SHUFFLE_WINDOW_TOKENS // seqlen) if blocks is None else blocks, 1)
        # Rank and world size are not part of it: the state is global, so any rank of any world size resumes it.
        self._fingerprint = {"seqlen": seqlen, "seed": seed, "data": data.model_dump(mode="json")}
        self._where = f"corpus {[s.path for s in data.sources]}"
        self._taken = [0] * len(self._sources)  # blocks drawn into windows, per source
        self._emitted = [0] * len(self._sources)  # blocks handed out (to any rank), per source
        self._window_index = -1
        self._window: list[tuple[int, torch.Tensor]] = []
        self._pos = 0

    def _draw(self) -> tuple[int, list[int]]:
        t = sum(self._taken)
        i = max(range(len(self._sources)), key=lambda j: (self._shares[j] * (t + 1) - self._taken[j], -j))
        self._taken[i] += 1
        return i, torch.tensor(self._sources[i].next_block(), dtype=torch.long)

    def _next_window(self) -> None:
        self._window_index += 1
        self._window_start = {"sources": [s.state_dict() for s in self._sources], "taken": list(self._taken)}
        blocks = self._fill_window()
        # what the sources had read once the window was full: a resume that refills it must read the same
        self._window_read = [(s.epoch, s._read.hexdigest()) for s in self._sources]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self._window_index) % 2**63)
        order = torch.randperm(len(blocks), generator=gen).tolist() if len(blocks) > 1 else [0]
        self._window, self._pos = [blocks[j] for j in order], 0

    def _fill_window(self) -> list[tuple[int, torch.Tensor]]:
        """The next window's blocks in blend order: `_window_size` of them, fewer once every source has
        begun a new epoch in this window."""
        epochs = [s.epoch for s in self._sources]
        blocks = []
        while len(blocks) < self._window_size and not all(s.epoch > e for s, e in zip(self._sources, epochs)):
            blocks.append(self._draw())
        return blocks

    def _block(self) -> torch.Tensor:
        if self._pos >= len(self._window):
            self._next_window()
        source, block = self._window[self._pos]
        self._pos += 1
        self._emitted[source] += 1
        return block

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        for _ in range(self.rank):
            self._block()
        block = self._block()
        for _ in range(self.world_size - 1 - self.rank):
            self._block()
        return block

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.stack([next(self) for _ in range(batch_size)])

    def token_shares(self) -> dict[str, float]:
        """The realised share of tokens per source, over every block handed out so far (all ranks)."""
        total = sum(self._emitted)
        return {label: (n / total if total else 0.0) for label, n in zip(self.labels, self._emitted)}

    def tokens(self) -> int:
        """Tokens handed out so far, to all ranks."""
        return sum(self._emitted) * self.seqlen

    def state_dict(self) -> dict:
        start = self._window_start if self._window_index >= 0 else {
            "sources": [s.state_dict() for s in self._sources], "taken": list(self._taken)}
        return {"version": self.STATE_VERSION, "window": self._window_index, "pos": self._pos, "start": start,
                "emitted": list(self._emitted), "fingerprint": self._fingerprint,
                "window_read": [list(r) for r in self._window_read] if self._window_index >= 0 else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise MaskpipeError(f"{self._where}: the state is from an older stream format (version "
                                f"{state.get('version', 1)}, this is {self.STATE_VERSION}); it cannot be resumed")
        saved = state.get("fingerprint", {})
        diffs = [
            f"{k}: saved {saved.get(k)!r}, this stream {v!r}" for k, v in self._fingerprint.items() if saved.get(k) != v
        ]
        if diffs:
            raise MaskpipeError(f"{self._where}: the state is from a different stream; " + "; ".join(diffs))
        for src, s in zip(self._sources, state["start"]["sources"]):
            src.load_state_dict(s)
        self._taken = list(state["start"]["taken"])
        self._emitted = list(state["emitted"])
        self._window_index, self._window, self._pos = max(state["window"] - 1, -1), [], 0
        if state["window"] >= 0:
            self._next_window()
            self._pos = state["pos"]
            saved = state.get("window_read")
            for label, was, now in zip(self.labels, saved or [], self._window_read):
                if list(was) != list(now):
                    raise MaskpipeError(f"corpus {label!r}: what was read up to the checkpoint differs from what "
                                        "is read now (the corpus changed since); resume with the corpus as it was, "
                                        "or start a new run")


def calibration_blocks(data: DataConfig, tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The first `n_samples` blocks of a single-rank TokenStream: [n_samples, seqlen]. With the
    block shuffle they are spread over the first window of the blend (2M tokens by default)."""
    return TokenStream(data, tokenizer, seqlen, seed=seed).next_batch(n_samples)


def check_source(data: DataConfig, src: Source, tokenizer, seqlen: int) -> None:
    """Read one source of `data` as a run's stream reads it, until its first block of `seqlen` tokens:
    its errors (an empty corpus, fewer tokens than one block, a record without its text field) come
    before any model work, in the words the stream would use mid-stage."""
    _SourceBlocks(open_source(src), tokenizer, seqlen, f"corpus {src.path!r}", data.separator).next_block()


def eval_tokens(data: DataConfig, tokenizer, want: int) -> int:
    """How many tokens `eval_text(data)` holds, reading only as far as `want` of them: the exact count
    when it holds fewer. (Tokens are never fewer than a text's characters divided by a few dozen, so
    the prefix read is short.)"""
    records = (r["text"] for src in data.sources for r in _utf8(_load_source(src), f"corpus {src.path!r}"))
    parts, chars, cap = [], 0, 8 * want
    for text in records:
        parts.append(text)
        chars += len(text) + 2
        if chars >= cap:
            n = len(tokenizer("\n\n".join(parts)).input_ids)
            if n >= want:
                return n
            cap *= 2
    return len(tokenizer(_nonempty("\n\n".join(parts), data)).input_ids)


def _nonempty(text: str, data: DataConfig) -> str:
    if not text.strip():
        raise MaskpipeError(f"corpus {[s.path for s in data.sources]}: empty corpus, no record has any text")
    return text


def eval_text(data: DataConfig) -> str:
    """Every record of every source, in order, unshuffled and once, joined with "\\n\\n" (the
    wikitext-2 perplexity protocol keeps empty records too)."""
    return _nonempty("\n\n".join(r["text"] for src in data.sources
                                   for r in _utf8(_load_source(src), f"corpus {src.path!r}")), data)
