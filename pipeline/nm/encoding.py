"""Compact storage of N:M masks: each group as the rank of its kept positions, ranks packed in base C(M,N).

A group of M weights that keeps N is one of C = C(M,N) candidates, so it carries log2(C) bits, not M
(0.646 bits per weight for 2:4, against 1 for a bitmap). The encoding gets within 0.2% of that:

- rank: the group's index in `itertools.combinations(range(M), N)` order, the order of
  `pipeline.nm.learn.nm_candidates` and of an artifact's logits. By the combinatorial number system, for
  kept positions c_1 < ... < c_N: rank = C − 1 − Σ_i C(M − 1 − c_i, N + 1 − i).
- words: k consecutive ranks r_0 … r_{k−1} as the integer Σ_j r_j·C^j < C^k ≤ 2^w, in w bits. k runs
  over every block size that fits a 64-bit word and the fewest bits per group wins (ties: smaller k).
  For 2:4 that is 17 groups in 44 bits (0.647 bits per weight); table in docs/RESULTS.md.
- stream: the words' w low bits back to back, least significant bit first (the last word padded with
  rank 0), in bytes filled from their least significant bit.

`Codec` is the encoding an artifact names in its manifest. Everything is vectorised over groups, and a
tensor goes through in chunks of `CHUNK_WORDS` words, so memory stays bounded on billion-weight layers.
Patterns with C(M,N) ≥ 2^63 (M > 66), whose ranks do not fit an int64, fall back to the bitmap
(`packbits-le`, 1 bit per weight), the only encoding of format 1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from math import comb
from typing import Any

import numpy as np
import torch

COMBINADIC, BITMAP = "nm-combinadic", "packbits-le"
CHUNK_WORDS = 1 << 16  # a multiple of 8: every chunk but the last ends on a byte boundary


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def packing(n: int, m: int) -> tuple[int, int]:
    """(k, w): k groups per w-bit word, the fewest bits per group for any k with C(M,N)^k ≤ 2^64."""
    c = comb(m, n)
    best = None
    k = 1
    while c**k <= 2**64:
        w = max((c**k - 1).bit_length(), 1)  # the fewest bits that hold every value below C^k
        if best is None or w * best[0] < best[1] * k:
            best = (k, w)
        k += 1
    return best


@lru_cache(maxsize=None)
def _rank_terms(n: int, m: int) -> np.ndarray:
    """[M, N + 2]: entry (j, i) = C(M − 1 − j, N + 1 − i), the term of the i-th kept position at j."""
    return np.array([[comb(m - 1 - j, n + 1 - i) if 1 <= i <= n else 0 for i in range(n + 2)] for j in range(m)],
                    dtype=np.int64)


@lru_cache(maxsize=None)
def _unrank_counts(n: int, m: int) -> np.ndarray:
    """[M, N + 1]: entry (j, t) = candidates that keep position j when t positions are left to keep
    among j … M − 1 (0 when t = 0): the ranks below it keep j, in lexicographic order."""
    return np.array([[comb(m - 1 - j, t - 1) if t else 0 for t in range(n + 1)] for j in range(m)], dtype=np.int64)


def _rank_sum(groups: np.ndarray, n: int, m: int) -> np.ndarray:
    kept_so_far = np.cumsum(groups, axis=1)  # i of the i-th kept position, at that position
    terms = _rank_terms(n, m)[np.arange(m), np.minimum(kept_so_far, n + 1)] * groups
    return comb(m, n) - 1 - terms.sum(axis=1)


def _unrank_walk(ranks: np.ndarray, n: int, m: int) -> np.ndarray:
    counts = _unrank_counts(n, m)
    rest, left = ranks.astype(np.int64), np.full(len(ranks), n, dtype=np.int64)
    out = np.empty((len(ranks), m), dtype=bool)
    for j in range(m):
        below = counts[j, left]
        out[:, j] = keep = rest < below
        rest = rest - np.where(keep, 0, below)
        left = left - keep
    return out


# Up to M = 16 a group's bits index a table (2^M entries) of the ranks above, and a rank indexes the
# table of candidates: about 10x faster than the arithmetic, which larger M use directly.
TABLE_M = 16


def _codes(groups: np.ndarray) -> np.ndarray:
    packed = np.packbits(groups, axis=1, bitorder="little")
    return packed[:, 0] if packed.shape[1] == 1 else packed.view("<u2")[:, 0]


@lru_cache(maxsize=None)
def candidates(n: int, m: int) -> np.ndarray:
    """[C(M,N), M] bool: every candidate mask of a group, in rank order: the order of
    `itertools.combinations(range(M), N)` over the kept positions. The one definition of that order:
    the ranks above compute it, a learned mask's logits (`pipeline.nm.learn.nm_candidates`) follow it."""
    rows = np.array([[i in keep for i in range(m)] for keep in itertools.combinations(range(m), n)], dtype=bool)
    rows.flags.writeable = False  # cached: shared by every caller
    return rows


@lru_cache(maxsize=None)
def _rank_of_code(n: int, m: int) -> np.ndarray:
    table = np.zeros(2**m, dtype=np.int64)
    table[_codes(candidates(n, m))] = np.arange(comb(m, n))
    return table


def nm_rank(groups: np.ndarray, n: int, m: int) -> np.ndarray:
    """[G, M] bool groups that each keep exactly N -> [G] int64 ranks in combinations order."""
    return _rank_of_code(n, m)[_codes(groups)] if m <= TABLE_M else _rank_sum(groups, n, m)


def nm_unrank(ranks: np.ndarray, n: int, m: int) -> np.ndarray:
    """[G] ranks -> [G, M] bool groups."""
    return candidates(n, m)[ranks] if m <= TABLE_M else _unrank_walk(ranks, n, m)


def _to_words(ranks: np.ndarray, c: int, k: int) -> np.ndarray:
    digits = np.zeros(_ceil_div(len(ranks), k) * k, dtype=np.uint64)
    digits[: len(ranks)] = ranks
    digits = digits.reshape(-1, k)
    words = np.zeros(len(digits), dtype=np.uint64)
    for j in reversed(range(k)):  # Horner: r_0 + C·(r_1 + C·(r_2 + …))
        words = words * np.uint64(c) + digits[:, j]
    return words


def _from_words(words: np.ndarray, c: int, k: int) -> np.ndarray:
    if c**k < 2**64 and bool((words >= np.uint64(c**k)).any()):
        raise ValueError(f"a word holds a value ≥ C^k = {c}^{k}: not an encoding of {k} ranks")
    digits = np.empty((len(words), k), dtype=np.int64)
    for j in range(k):
        digits[:, j] = (words % np.uint64(c)).astype(np.int64)
        words = words // np.uint64(c)
    return digits.reshape(-1)


def _words_to_bits(words: np.ndarray, w: int) -> np.ndarray:
    bits = np.unpackbits(words.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(bits[:, :w].reshape(-1), bitorder="little")


def _bits_to_words(data: np.ndarray, n_words: int, w: int) -> np.ndarray:
    bits = np.zeros((n_words, 64), dtype=np.uint8)
    bits[:, :w] = np.unpackbits(data, count=n_words * w, bitorder="little").reshape(n_words, w)
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").reshape(-1).astype(np.uint64)


@dataclass(frozen=True)
class Codec:
    """How one artifact stores its N:M masks: `nm-combinadic` with k groups per w-bit word, or the
    bitmap. Written into the manifest, so a reader takes k and w from there, not from `packing`."""

    n: int
    m: int
    name: str
    k: int = 0
    w: int = 0

    @classmethod
    def best(cls, n: int, m: int) -> Codec:
        return cls(n, m, COMBINADIC, *packing(n, m)) if comb(m, n) < 2**63 else cls(n, m, BITMAP)

    @classmethod
    def from_json(cls, n: int, m: int, obj: str | dict[str, Any]) -> Codec:
        """From a manifest's `encoding`: format 1 wrote the bare string "packbits-le". ValueError if unknown."""
        if obj == BITMAP or (isinstance(obj, dict) and obj.get("name") == BITMAP):
            return cls(n, m, BITMAP)
        if isinstance(obj, dict) and obj.get("name") == COMBINADIC:
            k, w = obj.get("groups_per_word"), obj.get("word_bits")
            if not (isinstance(k, int) and isinstance(w, int) and k > 0 and 0 < w <= 64
                    and comb(m, n) < 2**63 and comb(m, n) ** k <= 2**w):
                raise ValueError(f"{COMBINADIC}: {k} groups of {n}:{m} do not fit a word of {w} bits")
            return cls(n, m, COMBINADIC, k, w)
        raise ValueError(f"unknown mask encoding {obj!r} (this maskpipe reads {COMBINADIC} and {BITMAP})")

    def to_json(self) -> dict[str, Any]:
        if self.name == BITMAP:
            return {"name": BITMAP, "bits_per_weight": 1.0}
        return {"name": COMBINADIC, "groups_per_word": self.k, "word_bits": self.w,
                "bits_per_weight": round(self.bits_per_weight, 4),
                "rank_order": "itertools.combinations(range(M), N)", "bit_order": "little"}

    @property
    def bits_per_weight(self) -> float:
        return 1.0 if self.name == BITMAP else self.w / (self.k * self.m)

    def nbytes(self, numel: int) -> int:
        if self.name == BITMAP:
            return _ceil_div(numel, 8)
        return _ceil_div(_ceil_div(numel // self.m, self.k) * self.w, 8)

    def encode(self, mask: torch.Tensor) -> np.ndarray:
        """A bool N:M mask (every group of M along the last dimension keeps exactly N; the caller
        checks) -> `nbytes(mask.numel())` uint8 bytes."""
        flat = mask.detach().cpu().numpy().reshape(-1)
        if self.name == BITMAP:
            return np.packbits(flat, bitorder="little")
        groups, step = flat.reshape(-1, self.m), CHUNK_WORDS * self.k
        return np.concatenate([
            _words_to_bits(_to_words(nm_rank(groups[i : i + step], self.n, self.m), comb(self.m, self.n), self.k),
                           self.w)
            for i in range(0, len(groups), step)])

    def decode(self, data: np.ndarray, shape: list[int]) -> torch.Tensor:
        """Inverse of `encode`: uint8 bytes -> bool mask of `shape`. ValueError if the bytes are no encoding."""
        numel = int(np.prod(shape))
        if len(data) != self.nbytes(numel):
            raise ValueError(f"{len(data)} bytes, expected {self.nbytes(numel)} for {numel} weights")
        if self.name == BITMAP:
            return torch.from_numpy(np.unpackbits(data, count=numel, bitorder="little").astype(bool)).reshape(shape)
        total_words, chunk_bytes = _ceil_div(numel // self.m, self.k), CHUNK_WORDS * self.w // 8
        ranks = []
        for i, first in enumerate(range(0, total_words, CHUNK_WORDS)):
            n_words = min(CHUNK_WORDS, total_words - first)
            piece = data[i * chunk_bytes : i * chunk_bytes + _ceil_div(n_words * self.w, 8)]
            ranks.append(_from_words(_bits_to_words(piece, n_words, self.w), comb(self.m, self.n), self.k))
        groups = nm_unrank(np.concatenate(ranks)[: numel // self.m], self.n, self.m)
        return torch.from_numpy(groups).reshape(shape)
