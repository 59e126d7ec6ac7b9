"""Valuation samples longer than the index's max_length are cut to it; the answer says which ones (in-process,
over gRPC, and as one warning line of the CLI) instead of answering silently for the first tokens only.

Before: two 100k-character responses that differ after ~2,400 characters got identical answers and nothing
said the text was cut.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from forvalue.client import InfluenceClient
from forvalue.client.cli import main

PROMPT = "Repeat: sun ->"
LONG_A = " sun" * 1500 + " moon" * 500  # ~8,500 characters: far past the 2,048-token max_length
LONG_B = " sun" * 1500 + " tree" * 500  # differs from A only after the cut
SHORT = " sun sun"


def test_cut_samples_are_named_in_process_and_over_grpc(local_index, influence_server):
    a = local_index.search([(PROMPT, LONG_A)], k=5)
    b = local_index.search([(PROMPT, LONG_B)], k=5)
    assert a.cut_samples == (0,) and b.cut_samples == (0,)
    assert [h.id for h in a.hits] == [h.id for h in b.hits]  # the same first max_length tokens: the same answer
    group = local_index.search([(PROMPT, SHORT), (PROMPT, LONG_A)], k=5)
    assert group.cut_samples == (1,)
    assert local_index.search([(PROMPT, SHORT)], k=5).cut_samples == ()
    per_sample = local_index.top_k([(PROMPT, SHORT), (PROMPT, LONG_A)], k=3, group=False)
    assert [(q, r.cut_samples) for q, r in per_sample] == [(0, ()), (1, (1,))]
    scores = local_index.scores([(PROMPT, SHORT), (PROMPT, LONG_A), (PROMPT, LONG_B)], batch=2)
    assert scores.cut_samples == (1, 2)
    with InfluenceClient(influence_server.address) as client:
        assert client.search([(PROMPT, SHORT), (PROMPT, LONG_A)], k=5).cut_samples == (1,)
        assert client.scores([(PROMPT, LONG_A), (PROMPT, SHORT)]).cut_samples == (0,)


def test_the_cli_warns_in_one_line(influence_server, tmp_path):
    r = CliRunner().invoke(main, ["query", "--server", influence_server.address, "--prompt", PROMPT,
                                  "--response", LONG_A, "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "were cut" in warnings[0] and "max_length" in warnings[0]
    assert json.loads(r.stdout)["hits"]
    r = CliRunner().invoke(main, ["query", "--server", influence_server.address, "--prompt", PROMPT,
                                  "--response", SHORT, "-k", "3"])
    assert r.exit_code == 0 and "warning" not in r.stderr
