"""Index build → search on a tiny model, against exact For-Value over the whole corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer.build import build_index
from forvalue.indexer.errors import IndexCorruptError, IndexMismatchError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.model import LoadedModel, model_fingerprint, tokenizer_fingerprint
from forvalue.indexer.score import exact_scores

from factories import make_model
from indexes import CFG, plain_corpus as corpus


def exact_all(lm, queries, samples, tokens="response"):
    cfg = ForwardConfig(tokens=tokens)
    head = Head.from_model(lm.model)
    fq = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in queries], cfg, head)
    ft = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples], cfg, head)
    return exact_scores(fq, ft, head)


@pytest.mark.parametrize("direction", ["most", "least"])
def test_search_with_full_rerank_equals_exact(built60, lm, direction):
    root, samples, _ = built60
    idx = Index.open(str(root), lm)
    queries = corpus(3, seed=9)
    S = exact_all(lm, queries, samples)
    for j, q in enumerate(queries):
        res = idx.search([q], k=5, direction=direction, rerank=len(samples))
        order = torch.argsort(S[j], descending=direction == "most")[:5]
        assert [h.id for h in res.hits] == [samples[i].id for i in order.tolist()]
        np.testing.assert_allclose([h.score for h in res.hits], S[j][order].numpy(), rtol=1e-4, atol=1e-4)
        assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
        assert res.hits[0].metadata["prompt"] == samples[order[0]].prompt
        assert res.hits[0].metadata["meta"]["source"] in ("a", "b")


def test_group_query_is_mean(built60, lm):
    root, samples, _ = built60
    idx = Index.open(str(root), lm)
    queries = corpus(4, seed=5)
    S = exact_all(lm, queries, samples).mean(0)
    res = idx.search(queries, k=3, rerank=len(samples))
    assert [h.id for h in res.hits] == [samples[i].id for i in torch.argsort(S, descending=True)[:3].tolist()]
    f = idx.encode(queries)
    sk = idx.sketcher.sketch(f, idx._cpu_head)
    # linearity: the group's sketch score is the mean of the members' sketch scores
    X = torch.from_numpy(np.concatenate([np.asarray(a) for a in idx.version.shard_arrays("sketch")]))
    torch.testing.assert_close(sk.mean(0) @ X.T, (sk @ X.T).mean(0), rtol=1e-4, atol=1e-3)


def test_faiss_topk_equals_brute_force(built60, lm):
    root, _, _ = built60
    idx = Index.open(str(root), lm)
    f = idx.encode(corpus(2, seed=3))
    q = idx.sketcher.sketch(f, idx._cpu_head).numpy()
    X = np.concatenate([np.asarray(a) for a in idx.version.shard_arrays("sketch")])
    _, ids = idx.ann.search(q, 7, "most")
    ref = torch.topk(torch.from_numpy(q @ X.T), 7).indices.numpy()
    assert (ids == ref).all()


def test_score_all_is_exact(built60, lm):
    root, samples, _ = built60
    idx = Index.open(str(root), lm)
    queries = corpus(2, seed=4)
    got = idx.score_matrix(idx.encode(queries), block=7)
    torch.testing.assert_close(got, exact_all(lm, queries, samples), rtol=1e-4, atol=1e-4)


def test_other_model_refused(built60):
    root, _, _ = built60
    other = make_model(seed=1)
    from factories import make_tokenizer

    tok = make_tokenizer()
    lm2 = LoadedModel(other, tok, "other", model_fingerprint(other), tokenizer_fingerprint(tok))
    with pytest.raises(IndexMismatchError, match="built with model"):
        Index.open(str(root), lm2)


def test_altered_file_refused_previous_version_usable(tmp_path, lm):
    root = tmp_path / "idx"
    samples = corpus(20)
    v1 = build_index(str(root), samples, lm, CFG)
    v2 = build_index(str(root), samples[:10], lm, CFG)
    target = root / "versions" / v2 / "shards" / "000000" / "sketch.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="sketch.npy"):
        Index.open(str(root), lm)
    idx = Index.open(str(root), lm, version=v1)
    assert idx.search(corpus(1, seed=8), k=2).hits
