"""The Python client (client/client.py): its errors are forvalue errors; batched scores as the in-process Index."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import ConfigError, ForValueError

from serving import corpus

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]


def test_client_errors_are_forvalue_errors(client):
    with pytest.raises(ServerError) as err:
        client.search(QUERIES[:1], k=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k: must be between 1 and 20" in str(err.value)
    assert isinstance(err.value, ForValueError)
    with pytest.raises(ConfigError):
        client.search(QUERIES[:1], direction="both")  # search mirrors Index.search: most or least
    with InfluenceClient("127.0.0.1:1", timeout=5) as nobody:
        with pytest.raises(ServerError) as err:
            nobody.info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_scores_in_batches_equal_the_in_process_scores(client, local_index):
    """Several ScoreAll calls (2 + 1 samples) combined by sample count: the mean over all three, as Index.scores."""
    want = local_index.scores(QUERIES)
    for batch in (1, 2, 3):
        got = client.scores(QUERIES, batch=batch)
        assert (got.ids, got.rows, got.version) == (want.ids, want.rows, want.version)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="batch must be >= 1"):
        client.scores(QUERIES, batch=0)
    with pytest.raises(ConfigError, match="at least one valuation sample"):
        client.scores([])


def test_unreachable_is_its_own_error_with_a_human_message():
    from forvalue.client.client import ServerUnreachableError

    with InfluenceClient("127.0.0.1:1", timeout=5) as nobody:
        with pytest.raises(ServerUnreachableError) as err:
            nobody.search(QUERIES[:1], k=1)
        assert "cannot reach forvalue server at 127.0.0.1:1" in str(err.value)
        with pytest.raises(ServerUnreachableError, match="after 0.3 s"):
            nobody.wait_until_ready(0.3)


def test_wait_until_ready_returns_at_once_for_a_serving_server(client):
    import time

    t0 = time.monotonic()
    client.wait_until_ready(30)
    assert time.monotonic() - t0 < 5
