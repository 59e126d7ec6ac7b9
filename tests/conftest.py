"""Shared fixtures: the tiny model and tokenizer from factories.py (no downloads)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from factories import make_model, make_tokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TEXTS = [
    ("Reverse: one two three ->", " three two one"),
    ("Upper: abc ->", " ABC"),
    ("Q: 2+2? A:", " 4"),
    ("Say hi", " hi there, friend"),
    ("x", " y"),
    ("Reverse: red green ->", " green red"),
    ("Upper: hello world ->", " HELLO WORLD"),
]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model64():
    return make_model(seed=0).double()


@pytest.fixture(scope="session")
def model32():
    return make_model(seed=0)


@pytest.fixture(scope="session")
def texts():
    return list(TEXTS)
