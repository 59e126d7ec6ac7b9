"""A seeded fact-tracing set: fictional people, paraphrased statements of their facts, distractors, questions.

Every person gets one value per field (birthplace, employer, trade, instrument, ...). Each fact is stated by
several paraphrase templates as training rows whose `prompt` is the text before the value and whose
`response` is the value, so the response tokens are exactly the fact. A lexical distractor mentions the same
person and the same value in an unrelated relation (a training row, a negative for that fact). Each fact has
one question (split "test") with the value as its answer: the valuation row. Statements and the question of
a fact share its label `<person id>/<field>`; a distractor's label is `<person id>/<field>/distractor`, so it
counts as a negative for every question. Extra fields: `role` (statement, distractor, question), `fact`
(the fact's label) and `template` (which template wrote the row).

Names and values are invented (no real person or place), so a model can only answer from the set itself.
Everything here is written for forvalue; nothing is derived from other datasets.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from forvalue.indexer.data import write_jsonl


@dataclass(frozen=True)
class Field:
    """One kind of fact: its value pool, the statement templates, the distractor templates and the question.

    Templates are format strings with `{name}`; the value is appended as the response, so a template is the
    text that precedes the value.
    """

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    distractors: tuple[str, ...]
    question: str


FIRST_NAMES: tuple[str, ...] = (
    "Alvor", "Brenna", "Castor", "Delphine", "Eskil", "Fenna", "Galen", "Hester", "Ilsabet", "Joren",
    "Kestrel", "Lisander", "Maelis", "Norrin", "Orla", "Perrin", "Quill", "Rosamund", "Soren", "Talwyn",
    "Ulric", "Veda", "Wendel", "Xanthe", "Yorick", "Zelie", "Anselm", "Briony", "Corwin", "Dagny",
)
SURNAMES: tuple[str, ...] = (
    "Ashgrove", "Brindlemoor", "Caskwell", "Dunmarrow", "Elderquist", "Farrowdale", "Glimmerton", "Hollowell",
    "Ivystone", "Jessamyr", "Kettlewick", "Larkspurn", "Merriweather", "Nettlefold", "Oakhaven", "Pennyroyal",
    "Quarrington", "Rookwood", "Saltmarsh", "Thistlewaite", "Umberlee", "Vantwick", "Whitlock", "Yarrowby",
)

FIELDS: tuple[Field, ...] = (
    Field(
        "birthplace",
        ("Velmora", "Quenbridge", "Ostrava Minor", "Tallowmere", "Brisketon", "Carnhollow", "Dunwyn", "Eskerfield",
         "Fallowmouth", "Greymarsh", "Harrowgate", "Ilfordshire", "Juniper Vale", "Kelderwick", "Lowmere"),
        ("{name} was born in", "The birthplace of {name} is", "{name} grew up in the town of",
         "Records show that {name} came into the world in", "{name}'s hometown is"),
        ("{name} once wrote a song titled",),
        "Question: Where was {name} born?\nAnswer:",
    ),
    Field(
        "employer",
        ("Brightwater Mills", "Copperleaf Labs", "Duskline Freight", "Emberfield Press", "Foxglove Textiles",
         "Glasswing Optics", "Harbor & Finch", "Ironbark Tools", "Juniper Rail", "Kingfisher Foods",
         "Lanternworks", "Moonvale Bank", "Northwind Ceramics", "Oakridge Pharma", "Pinecrest Motors"),
        ("{name} works for", "The employer of {name} is", "{name} has a job at",
         "Every morning {name} goes to work at", "{name} is employed by"),
        ("{name} once read a newspaper story about",),
        "Question: Which company does {name} work for?\nAnswer:",
    ),
    Field(
        "trade",
        ("glassblower", "cartographer", "beekeeper", "locksmith", "bookbinder", "clockmaker", "stonemason",
         "perfumer", "falconer", "cooper", "luthier", "tanner", "weaver", "chandler", "wheelwright"),
        ("{name} works as a", "By trade, {name} is a", "The profession of {name} is that of a",
         "{name} earns a living as a", "{name} trained for years to become a"),
        ("{name} once watched a film about a",),
        "Question: What is the trade of {name}?\nAnswer:",
    ),
    Field(
        "instrument",
        ("cello", "oboe", "harp", "bassoon", "accordion", "banjo", "mandolin", "tuba", "marimba", "zither",
         "clarinet", "sitar", "bagpipes", "trombone", "dulcimer"),
        ("{name} plays the", "The instrument {name} plays is the", "In the evenings {name} practises the",
         "{name} is a skilled player of the", "At concerts {name} performs on the"),
        ("{name} once saw a painting of a",),
        "Question: Which instrument does {name} play?\nAnswer:",
    ),
    Field(
        "pet",
        ("parrot", "tortoise", "ferret", "goldfish", "hedgehog", "rabbit", "iguana", "canary", "beagle", "donkey",
         "alpaca", "gecko", "hamster", "peacock", "goat"),
        ("{name} keeps a pet", "The pet of {name} is a", "At home {name} looks after a",
         "{name} adopted a", "{name} lives with a pet"),
        ("{name} once drew a picture of a",),
        "Question: What pet does {name} keep?\nAnswer:",
    ),
)


def make_facts_dataset(
    n_people: int = 30,
    n_fields: int = 4,
    n_templates: int = 4,
    n_distractors: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Generate the fact-tracing set as JSON-able rows.

    People are distinct (first name, surname) pairs drawn with `random.Random(seed)`; each gets one value per
    field, drawn from the field's pool (values repeat across people, as real facts do). For every fact the
    first `n_templates` statement templates of its field (their order shuffled per field by the seed) write
    one statement each, `n_distractors` distractor templates write the distractors, and the field's
    question writes the valuation row.

    Args:
        n_people: number of people (1 to len(FIRST_NAMES) * len(SURNAMES)).
        n_fields: fields per person, the first n of FIELDS (1 to len(FIELDS)).
        n_templates: statements per fact (1 to the number of statement templates of a field).
        n_distractors: distractors per fact (0 to the number of distractor templates of a field).
        seed: the only source of randomness; the same arguments give the same rows.

    Returns:
        Training rows (statements and distractors, person by person, field by field), then the questions;
        each with id, prompt, response (the value with a leading space), label, split, role, fact and template.

    Raises:
        ValueError: an argument is out of range.
    """
    n_names = len(FIRST_NAMES) * len(SURNAMES)
    if not 1 <= n_people <= n_names:
        raise ValueError(f"n_people must be between 1 and {n_names}, got {n_people}")
    if not 1 <= n_fields <= len(FIELDS):
        raise ValueError(f"n_fields must be between 1 and {len(FIELDS)}, got {n_fields}")
    fields = FIELDS[:n_fields]
    max_t = min(len(f.statements) for f in fields)
    if not 1 <= n_templates <= max_t:
        raise ValueError(f"n_templates must be between 1 and {max_t}, got {n_templates}")
    max_d = min(len(f.distractors) for f in fields)
    if not 0 <= n_distractors <= max_d:
        raise ValueError(f"n_distractors must be between 0 and {max_d}, got {n_distractors}")

    rng = random.Random(seed)
    pairs = rng.sample(range(n_names), n_people)
    names = [f"{FIRST_NAMES[p // len(SURNAMES)]} {SURNAMES[p % len(SURNAMES)]}" for p in pairs]
    templates = {}
    for f in fields:
        order = list(range(len(f.statements)))
        rng.shuffle(order)
        templates[f.name] = order[:n_templates]
    train: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    for k, name in enumerate(names):
        pid = f"p{k:03d}"
        for f in fields:
            value = rng.choice(f.values)
            fact = f"{pid}/{f.name}"
            for t in templates[f.name]:
                train.append({"id": f"train/{fact}/s{t}", "prompt": f.statements[t].format(name=name),
                              "response": f" {value}", "label": fact, "split": "train", "role": "statement",
                              "fact": fact, "template": f"{f.name}/s{t}"})
            for t in range(n_distractors):
                train.append({"id": f"train/{fact}/d{t}", "prompt": f.distractors[t].format(name=name),
                              "response": f" {value}", "label": f"{fact}/distractor", "split": "train",
                              "role": "distractor", "fact": fact, "template": f"{f.name}/d{t}"})
            questions.append({"id": f"test/{fact}", "prompt": f.question.format(name=name),
                              "response": f" {value}", "label": fact, "split": "test", "role": "question",
                              "fact": fact, "template": f"{f.name}/q"})
    return train + questions


def write_facts_example(path: str | os.PathLike[str], **kw: Any) -> int:
    """Write `make_facts_dataset(**kw)` to a JSONL file atomically; returns the number of rows."""
    return write_jsonl(path, make_facts_dataset(**kw))
