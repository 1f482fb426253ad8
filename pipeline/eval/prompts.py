"""Prompt templates and their assembly, shared by the retrieval evaluations (`pipeline.eval.retrieval`) and gate
learning's synthetic passkey samples (`pipeline.attention.plans`): an intro, a haystack of whole sentences with
needles at sentence boundaries, and a question, fitted to a length in tokens of the model's tokenizer."""

from __future__ import annotations

import random
import re

from maskpipe.pipeline import MaskpipeError

# The passkey template of Mohtashami & Jaggi (2023), as the fixture models were trained on it.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_DIGITS = 5

# RULER's multi-key / multi-value needle-in-a-haystack (Hsieh et al. 2024).
MULTIKEY_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.")
MULTIKEY_NEEDLE = "One of the special magic numbers for {key} is: {value}."
MULTIKEY_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                     "The special magic number for {key} mentioned in the provided text is")
MULTIVALUE_QUESTION = ("What are all the special magic numbers for {key} mentioned in the provided text? "
                       "The special magic numbers for {key} mentioned in the provided text are")
MULTIKEY_DIGITS = 7
MULTIKEY_WORDS = ("apple", "river", "garden", "silver", "mountain", "window", "forest", "candle", "harbor",
                  "meadow", "thunder", "lantern", "velvet", "compass", "island", "marble", "falcon", "orchard",
                  "pepper", "saddle", "tunnel", "violet", "walnut", "anchor", "bridge", "cactus", "dolphin")


def split_sentences(text: str) -> list[str]:
    """Sentences (or lines without end punctuation), whitespace-normalised, empty ones dropped."""
    return [s for s in (" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+|\n+", text)) if s]


def random_number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def build_prompt(tokenizer, intro: str, haystack: list[str], needles: list[str], depths: list[float],
                 question: str, length: int) -> tuple[list[int], float]:
    """Token ids of intro + haystack (sentences, in order) with each needle at the sentence boundary
    nearest its depth + question, with as many haystack sentences as fit in `length` tokens.
    Returns the ids and the first needle's realised depth."""
    fixed = len(tokenizer(" ".join([intro, *needles, question])).input_ids)
    if fixed > length:
        raise MaskpipeError(f"retrieval: a prompt of {length} tokens cannot hold its intro, needles and question "
                            f"({fixed} tokens)")
    sizes = [len(ids) for ids in tokenizer([" " + s for s in haystack], add_special_tokens=False).input_ids]
    n, used = 0, fixed
    while n < len(haystack) and used + sizes[n] <= length:
        used, n = used + sizes[n], n + 1
    while True:  # per-sentence counts only approximate the joined text's: drop sentences until it fits
        hay = list(haystack[:n])
        at = sorted((round(d * n), i) for i, d in enumerate(depths))
        for offset, (pos, i) in enumerate(at):
            hay.insert(pos + offset, needles[i])
        ids = tokenizer(" ".join([intro, *hay, question])).input_ids
        if len(ids) <= length or n == 0:
            return ids, (round(depths[0] * n) / n if n else 0.0)
        n -= 1
