"""The full ranking an index gives: re-ranked candidates first and last, the sketch's order between."""

from __future__ import annotations

import torch

from forvalue.indexer.evaluate import index_ranking


def test_index_ranking_order():
    exact = torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    approx = torch.tensor([9.0, 8.0, 7.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    top = torch.tensor([0, 1])      # the sketch's two best
    bottom = torch.tensor([3, 4])   # its two worst
    r = index_ranking(approx, exact, top, bottom)
    order = torch.argsort(r, descending=True).tolist()
    # top re-ranked by exact (1 before 0), then 2 and 5 by sketch (7 > 2), then bottom by exact (3 before 4)
    assert order == [1, 0, 2, 5, 3, 4]


def test_index_ranking_overlapping_candidates_counted_once():
    exact = torch.arange(5, dtype=torch.float64)
    approx = exact.clone()
    r = index_ranking(approx, exact, torch.tensor([4, 3, 2]), torch.tensor([2, 1, 0]))
    assert sorted(r.tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.argsort(r, descending=True).tolist() == [4, 3, 2, 1, 0]
