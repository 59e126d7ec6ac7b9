"""Tests of forvalue.indexer.examples: determinism, counts, noise, and that the rows load as eval sets."""

from __future__ import annotations

from collections import Counter

import pytest

from forvalue.indexer.data import load_eval_sets, read_samples
from forvalue.indexer.examples import PHRASES, PROMPT_TEMPLATE, TRANSFORMS, make_transform_dataset, write_example


def test_transforms_change_every_phrase_distinctly():
    for phrase in PHRASES:
        outputs = [t.apply(phrase) for t in TRANSFORMS]
        assert len(set(outputs)) == len(TRANSFORMS), phrase
        assert phrase not in outputs, phrase
        assert all(o.strip() for o in outputs)
    assert len(set(PHRASES)) == len(PHRASES) >= 30
    assert len({t.label for t in TRANSFORMS}) == len(TRANSFORMS)


def test_transform_examples():
    by = {t.label: t.apply for t in TRANSFORMS}
    assert by["reverse_words"]("a quick test") == "test quick a"
    assert by["drop_vowels"]("the old dog") == "th ld dg"
    assert by["pig_latin"]("the old string") == "ethay oldway ingstray"
    assert by["bracket_words"]("hi there") == "[hi] [there]"


def test_deterministic_and_seed_dependent():
    assert make_transform_dataset(seed=1, noise=0.2) == make_transform_dataset(seed=1, noise=0.2)
    assert make_transform_dataset(seed=1) != make_transform_dataset(seed=2)


@pytest.mark.parametrize("n_classes,n_train,n_test", [(6, 15, 3), (2, 4, 1), (10, 25, 5)])
def test_counts_and_layout(n_classes, n_train, n_test):
    rows = make_transform_dataset(n_classes, n_train, n_test)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(train) == n_classes * n_train and len(test) == n_classes * n_test
    assert rows == train + test
    assert Counter(r["label"] for r in train) == {t.label: n_train for t in TRANSFORMS[:n_classes]}
    assert Counter(r["label"] for r in test) == {t.label: n_test for t in TRANSFORMS[:n_classes]}
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["clean"] is True for r in rows)
    # train and test phrases are disjoint, and every class uses the same phrases
    phrase = lambda r: r["prompt"].split("): ", 1)[1].removesuffix("\nAnswer:")  # noqa: E731
    train_phrases = {phrase(r) for r in train}
    test_phrases = {phrase(r) for r in test}
    assert len(train_phrases) == n_train and len(test_phrases) == n_test
    assert not train_phrases & test_phrases


def test_clean_rows_follow_template():
    by = {t.label: t for t in TRANSFORMS}
    for r in make_transform_dataset():
        t = by[r["label"]]
        phrase = r["prompt"].split("): ", 1)[1].removesuffix("\nAnswer:")
        assert r["prompt"] == PROMPT_TEMPLATE.format(instruction=t.instruction, phrase=phrase)
        assert r["response"] == " " + t.apply(phrase)


@pytest.mark.parametrize("noise", [0.1, 0.25, 0.5])
def test_noise_share(noise):
    rows = make_transform_dataset(noise=noise, seed=3)
    train = [r for r in rows if r["split"] == "train"]
    noisy = [r for r in train if not r["clean"]]
    assert len(noisy) == int(noise * len(train) + 0.5)  # half up: 0.25 * 90 = 22.5 -> 23
    assert all(r["clean"] for r in rows if r["split"] == "test")
    by = {t.label: t for t in TRANSFORMS}
    others = {t.label for t in TRANSFORMS[:6]}
    for r in noisy:
        phrase = r["prompt"].split("): ", 1)[1].removesuffix("\nAnswer:")
        assert r["response"] != " " + by[r["label"]].apply(phrase)  # label kept, response from another class
        assert r["response"] in {" " + by[o].apply(phrase) for o in others - {r["label"]}}
    clean_rows = make_transform_dataset(noise=0.0, seed=3)
    assert [r["prompt"] for r in clean_rows] == [r["prompt"] for r in rows]


@pytest.mark.parametrize("kw", [dict(n_classes=0), dict(n_classes=len(TRANSFORMS) + 1), dict(n_test_per_class=0),
                                dict(n_train_per_class=28, n_test_per_class=3), dict(noise=1.5),
                                dict(noise=0.1, n_classes=1)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        make_transform_dataset(**kw)


def test_written_file_loads(tmp_path):
    path = tmp_path / "example.jsonl"
    assert write_example(path, noise=0.2, seed=5) == 108
    samples = read_samples(path)
    assert [s.id for s in samples] == [r["id"] for r in make_transform_dataset(noise=0.2, seed=5)]
    valuation, training = load_eval_sets(path)
    assert len(valuation) == 18 and len(training) == 90
    assert sum(s.clean is False for s in training) == 18
    assert all(s.response.startswith(" ") and s.label for s in samples)
