"""Fixtures of the indexer tests: small indexes built once per session and shared by several test modules."""

from __future__ import annotations

import pytest

from forvalue.indexer.build import build_index

from indexes import CFG, meta_corpus, plain_corpus


@pytest.fixture(scope="session")
def built60(tmp_path_factory, lm):
    """(root, samples, version name): 60 samples with a source a/b (index and build tests)."""
    root = tmp_path_factory.mktemp("idx")
    samples = plain_corpus(60)
    name = build_index(str(root), samples, lm, CFG)
    return root, samples, name


@pytest.fixture(scope="session")
def built(tmp_path_factory, lm):
    """(root, samples): 48 samples with source, license and year metadata (filters, deletion, answers)."""
    root = tmp_path_factory.mktemp("answers")
    samples = meta_corpus(48)
    build_index(str(root), samples, lm, CFG)
    return root, samples


@pytest.fixture(scope="session")
def index(built, lm):
    from forvalue.indexer.index import Index

    return Index.open(str(built[0]), lm)


@pytest.fixture(scope="session")
def exact(lm, built):
    """Exact S (3 queries × 48 rows), float32 features as the index stores them."""
    from forvalue.indexer.features import ForwardConfig, Head
    from forvalue.indexer.forward import extract_features
    from forvalue.indexer.score import exact_scores

    _, samples = built
    cfg = ForwardConfig(tokens="response")
    head = Head.from_model(lm.model)
    queries = meta_corpus(3, seed=9, prefix="q")
    fq = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in queries], cfg, head)
    ft = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples], cfg, head)
    return queries, exact_scores(fq, ft, head).double(), (fq, ft, head)
