"""Sketches of G against explicit R G Pᵀ, exactness with identity maps, linearity."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.config import SketchConfig
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.score import exact_scores, reference_G
from forvalue.indexer.sketch import (
    Sketcher, _row_blocks, bucket_residuals, fit_projection, fit_sketcher, reference_sketch, token_mass, vocab_pass,
)


@pytest.fixture(scope="module")
def feats(model64, tokenizer, texts):
    f = extract_features(model64, tokenizer, texts, ForwardConfig(tokens="all", dtype=torch.float64))
    return f, Head.from_model(model64, torch.float64)


@pytest.mark.parametrize("chunk, rows", [(7, 3), (128, 512), (50, 1)])
def test_bucket_residuals_fused_equals_reference(feats, chunk, rows):
    f, head = feats
    g = torch.Generator().manual_seed(3)
    m = 10
    bucket = torch.randint(0, m, (head.vocab_size,), generator=g)
    sign = (torch.randint(0, 2, (head.vocab_size,), generator=g) * 2 - 1).double()
    lse, res = bucket_residuals(f.h, f.y, head, bucket, sign, m, chunk, rows)
    torch.testing.assert_close(lse, f.lse, atol=1e-10, rtol=1e-10)
    pi = torch.softmax(head.logits(f.h), -1)
    e = torch.zeros_like(pi)
    e[torch.arange(pi.shape[0]), f.y] = 1
    R = torch.zeros(m, head.vocab_size, dtype=torch.float64)
    R[bucket, torch.arange(head.vocab_size)] = sign
    torch.testing.assert_close(res, (e - pi) @ R.T, atol=1e-10, rtol=1e-10)


def test_sketch_equals_explicit_RGP(feats):
    f, head = feats
    sk = fit_sketcher(f, head, SketchConfig(rank=5, buckets=12, dedicated=4, seed=1))
    torch.testing.assert_close(sk.sketch(f, head, chunk=50), reference_sketch(f, head, sk), atol=1e-9, rtol=1e-9)


def test_identity_maps_give_exact_scores(feats):
    f, head = feats
    V, d = head.vocab_size, head.dim
    sk = Sketcher(torch.eye(d, dtype=torch.float64), torch.arange(V), torch.ones(V, dtype=torch.float64), V)
    s = sk.sketch(f, head)
    torch.testing.assert_close(s @ s.T, exact_scores(f, f, head), atol=1e-6, rtol=1e-8)


def test_group_sketch_is_mean_of_member_sketches(feats):
    f, head = feats
    sk = fit_sketcher(f, head, SketchConfig(rank=4, buckets=16, seed=0))
    members = sk.sketch(f, head)[:3]
    R = torch.zeros(sk.buckets, head.vocab_size, dtype=torch.float64)
    R[sk.bucket, torch.arange(head.vocab_size)] = sk.sign
    g_mean = reference_G(f.select([0, 1, 2]), head).mean(0)
    torch.testing.assert_close(members.mean(0), (R @ g_mean @ sk.projection.T).flatten(), atol=1e-9, rtol=1e-9)


def test_fit_projection_is_top_eigenspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    h = torch.randn(500, 20, generator=g, dtype=torch.float64) * torch.linspace(10, 0.1, 20, dtype=torch.float64)
    h = h @ basis.T
    P = fit_projection(h, 3)
    torch.testing.assert_close(P @ P.T, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    # the captured energy equals the sum of the top-3 eigenvalues of hᵀh
    ev = torch.linalg.eigvalsh(h.T @ h)
    torch.testing.assert_close(((h @ P.T) ** 2).sum(), ev[-3:].sum(), atol=1e-6, rtol=1e-9)


def test_heavy_tokens_get_dedicated_buckets(feats):
    f, head = feats
    cfg = SketchConfig(rank=4, buckets=16, dedicated=6)
    sk = fit_sketcher(f, head, cfg)
    heavy = torch.argsort(token_mass(f, head), descending=True)[:6]
    assert sorted(sk.bucket[heavy].tolist()) == list(range(6))
    others = torch.ones(head.vocab_size, dtype=torch.bool)
    others[heavy] = False
    assert (sk.bucket[others] >= 6).all()


def test_token_mass_is_l1_of_residuals(feats):
    f, head = feats
    pi = torch.softmax(head.logits(f.h), -1)
    e = torch.zeros_like(pi)
    e[torch.arange(pi.shape[0]), f.y] = 1
    torch.testing.assert_close(token_mass(f, head), (e - pi).abs().sum(0), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("chunk, rows, top", [(7, 3, 0), (128, 512, 5), (50, 1, 0), (33, 20, 3)])
def test_vocab_pass_norms_equal_explicit_G(feats, chunk, rows, top):
    """‖G_j‖² fused into the vocabulary pass = the squared Frobenius norm of the explicit G, also when a
    sample is longer than a row block (rows=1, 3) and with the top probabilities merged in the same pass."""
    f, head = feats
    g = torch.Generator().manual_seed(5)
    m = 8
    bucket = torch.randint(0, m, (head.vocab_size,), generator=g)
    sign = (torch.randint(0, 2, (head.vocab_size,), generator=g) * 2 - 1).double()
    want = (reference_G(f, head).flatten(1) ** 2).sum(1)
    assert want.min() > 1e-3
    vp = vocab_pass(f.h, f.y, head, bucket, sign, m, top, chunk, rows, offsets=f.offsets)
    torch.testing.assert_close(vp.g_sq, want, atol=1e-9, rtol=1e-9)
    # and the rest of the pass is unchanged by asking for the norms
    plain = vocab_pass(f.h, f.y, head, bucket, sign, m, top, chunk, rows)
    assert plain.g_sq is None
    torch.testing.assert_close(vp.res, plain.res, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(vp.lse, plain.lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lengths, rows", [([3, 0, 5, 2, 7, 1], 6), ([10, 1, 1], 4), ([0, 0, 4], 2), ([2, 2], 100),
                                           ([4, 0, 0], 3)])
def test_row_blocks_hold_whole_samples(lengths, rows):
    """The blocks tile the rows; each sample's rows are one span of one block, spans in sample order (the
    fused norms count samples by span), and a block is over `rows` only when it holds one sample."""
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    blocks = _row_blocks(offsets[-1], rows, torch.tensor(offsets))
    spans = []
    for a, b, cuts in blocks:
        assert cuts[0] == 0 and cuts[-1] == b - a
        nonempty = sum(1 for c0, c1 in zip(cuts, cuts[1:]) if c1 > c0)
        assert b - a <= rows or nonempty == 1
        spans += [(a + c0, a + c1) for c0, c1 in zip(cuts, cuts[1:])]
    want = list(zip(offsets, offsets[1:]))
    assert spans == want[: len(spans)]
    assert all(s == e for s, e in want[len(spans):])  # only trailing empty samples may be left out
    assert [(a, b) for a, b, _ in blocks] == list(zip([0] + [b for _, b, _ in blocks[:-1]], [b for _, b, _ in blocks]))
