"""forvalue's own small example dataset: sentence transformations with class labels and optional noise.

Each class is one deterministic rewriting of a short English sentence (upper case, reversed word order,
pig latin, ...). A row asks for the rewriting in its prompt and gives the rewritten sentence as its
response, so a good valuation method ranks training rows of the same transformation highest. Every class
uses the same phrases, train and test phrases are disjoint, so only the transformation tells classes
apart. With `noise` > 0 some training rows get the response of another transformation while keeping their
label (clean=False): the detection target for data-cleaning demos.

The phrases and transformations are written for forvalue; nothing here is derived from other datasets.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forvalue.indexer.data import write_jsonl

PROMPT_TEMPLATE = "Rewrite the sentence ({instruction}): {phrase}\nAnswer:"
RESPONSE_TEMPLATE = " {transformed}"

PHRASES: tuple[str, ...] = (
    "the old dog sleeps by the fire",
    "green apples fall from tall trees",
    "my sister plays the violin at night",
    "rain taps softly on the tin roof",
    "we walked home along the quiet river",
    "fresh bread smells best in the morning",
    "the small boat drifts toward the harbor",
    "children laugh while chasing paper kites",
    "his bicycle has one flat tire",
    "snow covers every roof in the village",
    "the teacher writes long notes on the board",
    "owls hunt quietly under the full moon",
    "coffee tastes bitter without any sugar",
    "the train leaves the station at noon",
    "bright lanterns glow along the narrow street",
    "my neighbor grows tomatoes on her balcony",
    "waves crash loudly against the rocky shore",
    "the cat watches birds from the window",
    "she painted the fence deep blue",
    "farmers gather wheat before the storm",
    "the museum opens its doors on sunday",
    "tiny ants carry crumbs across the table",
    "our team won the final match today",
    "the baker sells warm rolls every morning",
    "clouds drift slowly over the green hills",
    "he forgot his keys inside the car",
    "the library stays open until late evening",
    "ducks swim across the calm pond",
    "wind rattles the old wooden shutters",
    "the clock on the wall stopped ticking",
)

VOWELS = "aeiou"


def _pig_latin_word(word: str) -> str:
    if word[0] in VOWELS:
        return word + "way"
    for k, ch in enumerate(word):
        if ch in VOWELS:
            return word[k:] + word[:k] + "ay"
    return word + "ay"


def _drop_vowels(sentence: str) -> str:
    words = ("".join(ch for ch in w if ch not in VOWELS) for w in sentence.split())
    return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Transform:
    """One class of the dataset: its label, the instruction shown in the prompt, and the rewriting."""

    label: str
    instruction: str
    apply: Callable[[str], str]


TRANSFORMS: tuple[Transform, ...] = (
    Transform("uppercase", "write every letter in upper case", lambda s: s.upper()),
    Transform("reverse_words", "reverse the order of the words", lambda s: " ".join(reversed(s.split()))),
    Transform("drop_vowels", "remove every vowel", _drop_vowels),
    Transform("double_words", "say each word twice", lambda s: " ".join(f"{w} {w}" for w in s.split())),
    Transform("sort_words", "sort the words alphabetically", lambda s: " ".join(sorted(s.split()))),
    Transform("dashes", "join the words with dashes", lambda s: "-".join(s.split())),
    Transform("title_case", "capitalise the first letter of each word",
              lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split())),
    Transform("pig_latin", "translate it into pig latin", lambda s: " ".join(_pig_latin_word(w) for w in s.split())),
    Transform("mirror_words", "spell each word backwards", lambda s: " ".join(w[::-1] for w in s.split())),
    Transform("bracket_words", "put each word in square brackets", lambda s: " ".join(f"[{w}]" for w in s.split())),
)


def _row(row_id: str, transform: Transform, phrase: str, applied: Transform, split: str, clean: bool) -> dict:
    return {
        "id": row_id,
        "prompt": PROMPT_TEMPLATE.format(instruction=transform.instruction, phrase=phrase),
        "response": RESPONSE_TEMPLATE.format(transformed=applied.apply(phrase)),
        "label": transform.label,
        "split": split,
        "clean": clean,
    }


def make_transform_dataset(
    n_classes: int = 6,
    n_train_per_class: int = 15,
    n_test_per_class: int = 3,
    noise: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Generate the sentence-transformation dataset as JSON-able rows.

    Classes are the first `n_classes` of `TRANSFORMS`. `PHRASES` is shuffled with `random.Random(seed)`;
    the first `n_test_per_class` phrases are the test phrases and the next `n_train_per_class` the train
    phrases, the same for every class. Rows: all train rows (class by class), then all test rows.
    With noise > 0, floor(noise * n_train + 0.5) training rows, drawn at random, get the response of another
    class's transformation (drawn at random) while keeping their label and prompt; they have clean=False.

    Args:
        n_classes: number of transformations, 1 to len(TRANSFORMS).
        n_train_per_class: training rows per class (>= 1).
        n_test_per_class: test (valuation) rows per class (>= 1); with n_train_per_class at most
            len(PHRASES) in total.
        noise: share of corrupted training rows, in [0, 1]; needs n_classes >= 2 when > 0.
        seed: the only source of randomness; the same arguments give the same rows.

    Returns:
        Rows with id ("train/<label>/<k>" or "test/<label>/<k>"), prompt, response, label, split and
        clean (True everywhere when noise is 0).

    Raises:
        ValueError: an argument is out of range.
    """
    if not 1 <= n_classes <= len(TRANSFORMS):
        raise ValueError(f"n_classes must be between 1 and {len(TRANSFORMS)}, got {n_classes}")
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError(f"need at least one train and one test row per class, got {n_train_per_class} "
                         f"and {n_test_per_class}")
    if n_train_per_class + n_test_per_class > len(PHRASES):
        raise ValueError(f"n_train_per_class + n_test_per_class must be at most {len(PHRASES)} (the number of "
                         f"phrases), got {n_train_per_class + n_test_per_class}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if noise > 0 and n_classes < 2:
        raise ValueError("noise > 0 needs n_classes >= 2 (a noisy row takes another class's response)")

    rng = random.Random(seed)
    phrases = list(PHRASES)
    rng.shuffle(phrases)
    test_phrases = phrases[:n_test_per_class]
    train_phrases = phrases[n_test_per_class:n_test_per_class + n_train_per_class]
    classes = TRANSFORMS[:n_classes]

    n_train = n_classes * n_train_per_class
    n_noisy = math.floor(noise * n_train + 0.5)  # half up, not Python's round-half-even
    noisy = set(rng.sample(range(n_train), n_noisy))

    rows = []
    for c, transform in enumerate(classes):
        for k, phrase in enumerate(train_phrases):
            j = c * n_train_per_class + k
            applied = transform
            if j in noisy:
                applied = rng.choice([t for t in classes if t is not transform])
            rows.append(_row(f"train/{transform.label}/{k}", transform, phrase, applied, "train", j not in noisy))
    for transform in classes:
        for k, phrase in enumerate(test_phrases):
            rows.append(_row(f"test/{transform.label}/{k}", transform, phrase, transform, "test", True))
    return rows


def write_example(path: str | os.PathLike[str], **kw: Any) -> int:
    """Write `make_transform_dataset(**kw)` to a JSONL file atomically; returns the number of rows."""
    return write_jsonl(path, make_transform_dataset(**kw))
