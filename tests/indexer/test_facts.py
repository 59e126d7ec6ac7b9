"""Tests of forvalue.indexer.facts: determinism, counts, gold and negative labels, loading as eval sets."""

from __future__ import annotations

from collections import Counter

import pytest

from forvalue.indexer.data import load_eval_sets
from forvalue.indexer.facts import FIELDS, FIRST_NAMES, SURNAMES, make_facts_dataset, write_facts_example


def test_deterministic_and_seed_dependent():
    assert make_facts_dataset(seed=3) == make_facts_dataset(seed=3)
    assert make_facts_dataset(seed=3) != make_facts_dataset(seed=4)


@pytest.mark.parametrize("people,fields,templates,distractors", [(30, 4, 4, 1), (5, 2, 3, 0), (12, 5, 5, 1)])
def test_counts_and_labels(people, fields, templates, distractors):
    rows = make_facts_dataset(people, fields, templates, distractors, seed=1)
    roles = Counter(r["role"] for r in rows)
    n_facts = people * fields
    expected = Counter({"statement": n_facts * templates, "distractor": n_facts * distractors, "question": n_facts})
    assert roles == +expected  # unary + drops a zero count
    questions = [r for r in rows if r["split"] == "test"]
    assert all(r["role"] == "question" for r in questions) and len(questions) == n_facts
    assert len({r["id"] for r in rows}) == len(rows)
    for q in questions:
        gold = [r for r in rows if r["split"] == "train" and r["label"] == q["label"]]
        # gold = exactly the fact's statements, all stating the question's answer
        assert len(gold) == templates and all(r["role"] == "statement" for r in gold)
        assert all(r["response"] == q["response"] and r["fact"] == q["fact"] for r in gold)
        assert len({r["prompt"] for r in gold}) == templates  # paraphrases, not copies
        # distractors: same person and value, labelled as negatives for every question
        dis = [r for r in rows if r["role"] == "distractor" and r["fact"] == q["fact"]]
        assert len(dis) == distractors
        name = next(f"{a} {b}" for a in FIRST_NAMES for b in SURNAMES if f"{a} {b}" in q["prompt"])
        assert all(name in r["prompt"] for r in gold)
        for d in dis:
            assert d["response"] == q["response"] and name in d["prompt"]
            assert d["label"] != q["label"] and not any(d["label"] == x["label"] for x in questions)


def test_prompt_is_the_text_before_the_value():
    rows = make_facts_dataset(4, 4, 4, 1, seed=0)
    for r in rows:
        assert r["response"].startswith(" ") and r["response"].strip() and not r["prompt"].endswith(" ")
    # the people are distinct and every statement names its person
    q = [r for r in rows if r["role"] == "question"]
    names = [next(f"{a} {b}" for a in FIRST_NAMES for b in SURNAMES if f"{a} {b}" in r["prompt"])
             for r in q if r["template"] == "birthplace/q"]
    assert len(set(names)) == len(names) == 4


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="n_people"):
        make_facts_dataset(n_people=0)
    with pytest.raises(ValueError, match="n_fields"):
        make_facts_dataset(n_fields=len(FIELDS) + 1)
    with pytest.raises(ValueError, match="n_templates"):
        make_facts_dataset(n_templates=99)
    with pytest.raises(ValueError, match="n_distractors"):
        make_facts_dataset(n_distractors=5)


def test_written_file_loads_as_eval_sets(tmp_path):
    path = tmp_path / "facts.jsonl"
    n = write_facts_example(path, n_people=3, n_fields=2, n_templates=2, seed=0)
    valuation, train = load_eval_sets(path)
    assert n == len(valuation) + len(train) == 3 * 2 * (2 + 1 + 1)
    assert {s.meta["role"] for s in train} == {"statement", "distractor"}
    assert all(s.split == "test" for s in valuation)
