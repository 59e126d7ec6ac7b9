"""Shared fixtures: the tiny model and tokenizer from factories.py (no downloads)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from factories import make_model, make_tokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _gpu_skip_reason(marker) -> str | None:
    """Why a test marked `gpu` cannot run here (None: it can). `@pytest.mark.gpu` needs a CUDA device;
    `gpu(faiss=True)` also faiss with GPU support; `gpu(count=N)` N devices."""
    count = marker.kwargs.get("count", 1)
    if torch.cuda.device_count() < count:
        return f"needs {count} CUDA device(s)"
    if marker.kwargs.get("faiss"):
        from forvalue.indexer.ann import gpu_count

        if gpu_count() < count:
            return f"needs faiss-gpu and {count} GPU(s)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("gpu")
        reason = None if marker is None else _gpu_skip_reason(marker)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))

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
def lm(model32, tokenizer):
    """The tiny model and tokenizer as a LoadedModel (what an Index or a build takes), named "tiny"."""
    from forvalue.indexer.model import LoadedModel, model_fingerprint, tokenizer_fingerprint

    return LoadedModel(model32, tokenizer, "tiny", model_fingerprint(model32), tokenizer_fingerprint(tokenizer))


@pytest.fixture(scope="session")
def texts():
    return list(TEXTS)


# --- the influence service: one tiny model directory, one tiny index, one server for the session ------


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory, model32, tokenizer):
    """The tiny model saved as a Hugging Face directory (what `--model` takes)."""
    d = tmp_path_factory.mktemp("tiny-model")
    model32.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def served_lm(served_model_dir):
    from forvalue.indexer.model import load_model

    return load_model(served_model_dir)


@pytest.fixture(scope="session")
def served_index(tmp_path_factory, served_lm):
    """(index directory, its training samples): 36 samples built with the tiny model."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig, SketchConfig

    from serving import corpus

    root = tmp_path_factory.mktemp("served-index")
    samples = corpus(36)
    cfg = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=36), shard_size=16)
    build_index(str(root), samples, served_lm, cfg, progress=False)
    return str(root), samples


@pytest.fixture(scope="session")
def local_index(served_index, served_lm):
    """The served index opened in-process: the reference every remote answer is compared with."""
    from forvalue.indexer.index import Index

    return Index.open(served_index[0], served_lm)


@pytest.fixture(scope="session")
def influence_server(served_index, served_model_dir):
    """A running server (default loader: model directory + index directory), ready; yields ServerThread."""
    from forvalue.server.config import ServerConfig

    from serving import ServerThread

    srv = ServerThread(ServerConfig(index_dir=served_index[0], model_path=served_model_dir, k_cap=20))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(influence_server):
    """The real client of the session's server."""
    from forvalue.client.client import InfluenceClient

    with InfluenceClient(influence_server.address, timeout=60) as c:
        yield c
