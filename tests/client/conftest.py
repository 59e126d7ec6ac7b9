"""Fixtures of the CLI tests: the same index reached in-process and through the test server."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sources(served_index, served_model_dir, influence_server):
    """How to reach the same index: in-process (with its model) or through the test server (CLI arguments)."""
    return {"index": ["--index", served_index[0], "--model", served_model_dir],
            "server": ["--server", influence_server.address]}
