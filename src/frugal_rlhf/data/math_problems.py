"""Arithmetic word problems with exact answers, for verifiable-reward training without a hub.

Levels (what SmolLM2-135M-Instruct gets right greedily with "Answer with just the number.":
one-digit addition 15/24, two-digit addition 4/24, a one-step multiplication word problem 0/24):

1. one-digit addition                 "What is 3 + 5?"
2. two-digit addition                 "What is 40 + 28?"
3. two-digit addition or subtraction, as a short story
4. one-step multiplication, as a short story
5. two steps (a product, then a sum or difference), as a short story

A problem's split (train or test) is decided by a hash of its numbers and operation, not of its
wording, so a held-out problem never appears in training under another phrasing, whatever the
seed or the number of rows asked for.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

INSTRUCTION = "Answer with just the number."
TEST_FRACTION = 0.2
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lena", "Omar")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")


def _problem(level: int, rng: random.Random) -> tuple[tuple, str, int]:
    """-> (identity: what the split hashes, the question, the answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if level in (1, 2):
        lo, hi = (1, 9) if level == 1 else (10, 99)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return (level, "+", a, b), f"What is {a} + {b}?", a + b
    if level == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return (level, "+", a, b), f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        a, b = max(a, b), min(a, b)
        return (level, "-", a, b), f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    if level == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 19)
        return (level, "*", a, b), f"{name} has {a} bags with {b} {item} in each. How many {item} is that in all?", a * b
    if level == 5:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        return ((level, "*+", a, b, c), f"{name} buys {a} boxes of {b} {item} and already had {c}. "
                f"How many {item} does {name} have now?", a * b + c)
    raise ValueError(f"math level must be 1..5, got {level}")


def split_of(identity: tuple) -> str:
    """train or test, from a hash of the problem itself (stable across runs and machines)."""
    digest = hashlib.sha256(repr(identity).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def generate(n: int, level: int, seed: int = 0, split: str = "train") -> list[dict]:
    """n distinct problems of one level from one split: rows {"prompt", "answer", "level"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    _problem(level, random.Random(0))  # a bad level fails here
    rng, rows, seen = random.Random(f"{seed}:{level}:{split}"), [], set()
    misses = 0
    while len(rows) < n:
        identity, question, answer = _problem(level, rng)
        if identity in seen or split_of(identity) != split:
            misses += 1
            if misses > 100 * n + 10_000:  # the level has fewer distinct problems in this split
                raise ValueError(f"level {level} has only about {len(rows)} distinct {split} problems; ask for fewer")
            continue
        seen.add(identity)
        rows.append({"prompt": f"{question} {INSTRUCTION}", "answer": str(answer), "level": level})
    return rows


def write_jsonl(rows, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
