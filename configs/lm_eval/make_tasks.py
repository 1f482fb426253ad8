"""Writes the example lm-eval tasks' data (run from the repository root; the output is committed):

    python configs/lm_eval/make_tasks.py

- `passkey_choice.jsonl`: a short passkey prompt (the fixture models' training template, filler
  haystack) and four 5-digit keys to choose from, one of them the hidden key.
- `kjv_cloze.jsonl`: a clause (up to . ; : ? !) of `tests/fixtures/corpora/kjv.valid.txt` (held-out text) without its
  last word, and four words to end it with: the true one and three last words of other verses.

Both are multiple-choice tasks in lm-eval's format (context, choices, gold index), read through
`dataset_path: json`, so `maskpipe lm-eval` and the `lm_eval` stage run end to end without a hub.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from maskpipe.pipeline.eval.retrieval import FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, random_number

HERE = Path(__file__).parent
KJV = Path("tests/fixtures/corpora/kjv.valid.txt")


def passkey_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        keys = [random_number(rng, 5) for _ in range(4)]
        label = rng.randrange(4)
        before, after = rng.randint(0, 3), rng.randint(0, 3)
        context = " ".join([PASSKEY_INTRO, *[FILLER] * before, PASSKEY_NEEDLE.format(key=keys[label]),
                            *[FILLER] * after, PASSKEY_QUESTION])
        rows.append({"context": context, "choices": [" " + k for k in keys], "label": label})
    return rows


def kjv_rows(n: int, rng: random.Random) -> list[dict]:
    verses = [v for v in re.split(r"(?<=[.;:?!])\s+", KJV.read_text().replace("\n", " ")) if 8 <= len(v.split()) <= 30]
    last = lambda v: re.sub(r"[^A-Za-z]", "", v.split()[-1])  # noqa: E731
    rows = []
    for v in rng.sample(verses, n):
        word = last(v)
        others = list(dict.fromkeys(w for w in (last(u) for u in rng.sample(verses, 40)) if w and w != word))[:3]
        choices = [word, *others]
        rng.shuffle(choices)
        rows.append({"context": " ".join(v.split()[:-1]), "choices": [" " + c for c in choices],
                     "label": choices.index(word)})
    return rows


def main() -> None:
    rng = random.Random(0)
    for name, rows in (("passkey_choice", passkey_rows(40, rng)), ("kjv_cloze", kjv_rows(40, rng))):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{HERE / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
