"""What both forward passes share (indexer/features.py): ForwardConfig validation, batch plans, Features selection."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.features import ForwardConfig, Head, plan_batches
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


def test_kept_distributions_equal_recomputed_ones_and_respect_the_budget(model32, tokenizer, texts):
    import dataclasses

    from forvalue.indexer.forward import extract_features

    head = Head.from_model(model32)
    plain = ForwardConfig(tokens="all", batch_tokens=64)
    ref = extract_features(model32, tokenizer, texts, plain, head)
    assert ref.probs is None
    rows = ref.h.shape[0] * head.vocab_size * 4
    kept = extract_features(model32, tokenizer, texts, dataclasses.replace(plain, probs_bytes=rows), head)
    torch.testing.assert_close(kept.lse, ref.lse, rtol=0, atol=0)  # the same log-partitions, bit for bit
    torch.testing.assert_close(kept.probs, head.probs(ref.h, ref.lse), rtol=1e-6, atol=1e-7)
    sel = kept.select([2, 0])
    torch.testing.assert_close(sel.probs, head.probs(sel.h, sel.lse), rtol=1e-6, atol=1e-7)
    # one byte short of all of them: none are kept (never some samples' and not others')
    assert extract_features(model32, tokenizer, texts, dataclasses.replace(plain, probs_bytes=rows - 1), head).probs is None
