"""What both forward passes share (indexer/features.py): ForwardConfig validation, batch plans, Features selection."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.features import ForwardConfig, plan_batches
from forvalue.indexer.forward import extract_features


def test_plan_batches_respects_budget():
    lengths = [5, 17, 3, 9, 17, 2, 30, 8]
    batches = plan_batches(lengths, batch_tokens=40, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40


def test_select_roundtrip(model64, tokenizer, texts):
    f = extract_features(model64, tokenizer, texts, ForwardConfig(dtype=torch.float64))
    g = f.select([3, 0, 2])
    s, e = int(f.offsets[3]), int(f.offsets[4])
    assert torch.equal(g.h[: e - s], f.h[s:e])
    assert g.n == 3 and int(g.offsets[-1]) == int(f.lengths[[3, 0, 2]].sum())


@pytest.mark.parametrize("bad", [dict(tokens="prompt"), dict(batch_tokens=0), dict(padding_side="up")])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        ForwardConfig(**bad)
