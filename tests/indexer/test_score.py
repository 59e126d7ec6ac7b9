"""Exact For-Value against a brute-force reference that builds every G = Σ (e − π) hᵀ explicitly."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.config import ScoreConfig
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import encode, extract_features
from forvalue.indexer.score import (
    embedding_sums, exact_scores, mean_self_score, reference_scores, scores, scores_gram, scores_pairs, self_scores,
    target_vocab,
)


def brute_G(model, tokenizer, samples, tokens):
    """G per sample from one unbatched pass with the model's own head → (n, |V|, d), float64."""
    out = []
    for p, r in samples:
        enc = encode(tokenizer, p, r, ForwardConfig(tokens=tokens))
        with torch.no_grad():
            o = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
        sl = slice(enc.score_from, len(enc.ids) - 1)
        h = o.hidden_states[-1][0, sl].double()
        pi = torch.softmax(o.logits[0, sl].double(), -1)
        e = torch.zeros_like(pi)
        e[torch.arange(pi.shape[0]), torch.tensor(enc.ids[enc.score_from + 1 :])] = 1.0
        out.append((e - pi).T @ h)
    return torch.stack(out)


@pytest.fixture(scope="module", params=["response", "all"])
def setup(request, model64, tokenizer, texts):
    tokens = request.param
    cfg = ForwardConfig(tokens=tokens, dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    val, train = texts[:3], texts[3:]
    fv = extract_features(model64, tokenizer, val, cfg)
    ft = extract_features(model64, tokenizer, train, cfg)
    gv, gt = brute_G(model64, tokenizer, val, tokens), brute_G(model64, tokenizer, train, tokens)
    return head, fv, ft, gv, gt


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [scores_pairs, scores_gram])
@pytest.mark.parametrize("memory_mb", [16, 1024])
def test_exact_equals_brute_force(setup, fn, memory_mb):
    head, fv, ft, gv, gt = setup
    ref = gv.flatten(1) @ gt.flatten(1).T
    assert ref.abs().max() > 1e-2  # the comparison is not vacuous
    _close(fn(fv, ft, head, None, memory_mb), ref)


@pytest.mark.parametrize("chunk", [7, 16384])
def test_self_scores_are_squared_norms_of_G(setup, chunk):
    head, fv, ft, gv, gt = setup
    want = (gt.flatten(1) ** 2).sum(1)
    assert want.min() > 1e-2
    _close(self_scores(ft, head, chunk=chunk), want)
    _close(self_scores(fv, head, chunk=chunk), torch.diagonal(gv.flatten(1) @ gv.flatten(1).T))


def test_mean_self_score_from_probabilities_is_the_squared_norm_of_the_mean_G(setup):
    head, fv, ft, gv, gt = setup
    for f, g in ((fv, gv), (ft, gt), (fv.select([1]), gv[1:2])):
        want = (g.mean(0) ** 2).sum()
        assert want > 1e-2
        _close(mean_self_score(f, head.probs(f.h, f.lse)), want)


@pytest.mark.parametrize("fn", [scores_pairs, scores_gram])
def test_restricted_vocab_equals_brute_force(setup, fn):
    head, fv, ft, gv, gt = setup
    vocab = torch.tensor([0, 2, 5, 17, 40, 41, 77, 100, 127])
    vocab = torch.unique(torch.cat([vocab, ft.y[:3]]))  # some targets inside, most outside
    ref = gv[:, vocab].flatten(1) @ gt[:, vocab].flatten(1).T
    _close(fn(fv, ft, head, vocab, 1024), ref)
    _close(reference_scores(fv, ft, head, vocab), ref)


def test_many_blocks_and_chunks(model64, tokenizer, texts):
    """Force tiny blocks and vocabulary chunks on a larger set: still equal."""
    cfg = ForwardConfig(tokens="all", dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    samples = [(p + " " * i, r) for i in range(4) for p, r in texts]
    f = extract_features(model64, tokenizer, samples, cfg)
    ref = reference_scores(f, f, head)
    tiny = 0.02  # MB: a few thousand floats, so every block holds one or two samples and chunks are narrow
    got_p = scores_pairs(f, f, head, None, tiny)
    got_g = scores_gram(f, f, head, None, tiny)
    _close(got_p, ref)
    _close(got_g, ref)
    # symmetric by construction
    _close(got_p, got_p.T)


def test_group_is_mean_of_members(setup):
    head, fv, ft, gv, gt = setup
    s = scores(fv, ft, head, ScoreConfig())
    ref = gv.mean(0).flatten() @ gt.flatten(1).T
    _close(s.mean(0), ref)


def test_emb_is_alpha_one(setup):
    head, fv, ft, _, _ = setup
    got = scores(fv, ft, head, ScoreConfig(method="emb"))
    ref = torch.stack([
        torch.stack([
            (fv.h[fv.offsets[v] : fv.offsets[v + 1]] @ ft.h[ft.offsets[i] : ft.offsets[i + 1]].T).sum()
            for i in range(ft.n)
        ]) for v in range(fv.n)
    ])
    _close(got, ref)
    _close(embedding_sums(fv), torch.stack([fv.h[fv.offsets[v] : fv.offsets[v + 1]].sum(0) for v in range(fv.n)]))


def test_shared_and_inbatch_vocab(setup):
    head, fv, ft, gv, gt = setup
    shared = target_vocab(ft)
    _close(scores(fv, ft, head, ScoreConfig(method="shared")),
           gv[:, shared].flatten(1) @ gt[:, shared].flatten(1).T)
    got = scores(fv, ft, head, ScoreConfig(method="inbatch", inbatch_size=2, inbatch_topk=3))

    def top3(f):  # union of each position's 3 most probable tokens, by the brute-force softmax
        return torch.unique(torch.cat([head.logits(f.h[k : k + 1]).topk(3).indices[0] for k in range(f.h.shape[0])]))

    for va in range(0, fv.n, 2):
        vi = list(range(va, min(va + 2, fv.n)))
        for a in range(0, ft.n, 2):
            ti = list(range(a, min(a + 2, ft.n)))
            vv, tv = top3(fv.select(vi)), top3(ft.select(ti))
            vocab = torch.tensor(sorted(set(vv.tolist()) & set(tv.tolist())), dtype=torch.long)
            ref = gv[vi][:, vocab].flatten(1) @ gt[ti][:, vocab].flatten(1).T
            _close(got[vi][:, ti], ref)


@pytest.mark.parametrize("strategy", ["pairs", "gram", "auto"])
def test_fp32_close_to_fp64(model32, model64, tokenizer, texts, strategy):
    f64 = extract_features(model64, tokenizer, texts, ForwardConfig(dtype=torch.float64))
    f32 = extract_features(model32, tokenizer, texts, ForwardConfig())
    s64 = exact_scores(f64, f64, Head.from_model(model64, torch.float64))
    s32 = exact_scores(f32, f32, Head.from_model(model32), strategy=strategy)
    torch.testing.assert_close(s32.double(), s64, atol=1e-3 * float(s64.abs().max()), rtol=1e-4)
