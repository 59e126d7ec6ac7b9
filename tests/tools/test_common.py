"""tools/common.py: the helpers the benchmark scripts share (example rows, a served index process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from common import example_rows, start_server  # noqa: E402


def test_example_rows_are_seeded_and_labelled():
    train, test = example_rows(seed=1)
    again, _ = example_rows(seed=1)
    other, _ = example_rows(seed=2)
    assert [s.to_dict() for s in train] == [s.to_dict() for s in again]
    assert [s.response for s in train] != [s.response for s in other]
    assert len(train) == 240 and len(test) == 60 and len({s.label for s in train}) == 10
    assert len({s.id for s in train}) == len(train)


def test_start_server_serves_the_index(served_index, served_model_dir):
    from forvalue.client import InfluenceClient

    proc, address = start_server(served_index[0], served_model_dir, ["--batch-wait-ms", "0"])
    try:
        with InfluenceClient(address, timeout=30) as client:
            assert client.health() == "SERVING"
            assert client.info()["n_samples"] == len(served_index[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
