"""Token-level attribution: contributions against a brute-force loop; every sum equals the exact score."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.explain import contributions, explain_rows, reference_contributions, summarize, token_labeler
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.score import exact_scores, reference_scores

from serving import corpus


@pytest.fixture(scope="module", params=["response", "all"])
def setup(request, model64, tokenizer, texts):
    cfg = ForwardConfig(tokens=request.param, dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    fv = extract_features(model64, tokenizer, texts[:3], cfg)
    ft = extract_features(model64, tokenizer, texts[3:], cfg)
    return head, fv, ft, request.param


@pytest.mark.parametrize("group", [[0], [0, 1, 2]])
def test_contributions_equal_brute_force_and_sum_to_exact_scores(setup, group):
    head, fv, ft, _ = setup
    q = fv.select(group)
    exact = exact_scores(q, ft, head, strategy="gram").mean(0)  # the other strategy than pair_alpha's
    ref = reference_scores(q, ft, head).mean(0)
    assert exact.abs().max() > 1e-2  # not vacuous
    for j in range(ft.n):
        C = contributions(q, ft.select([j]), head)
        assert C.shape == (q.h.shape[0], int(ft.lengths[j]))
        torch.testing.assert_close(C, reference_contributions(q, ft.select([j]), head), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(C.sum(), exact[j], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(C.sum(), ref[j], atol=1e-9, rtol=1e-9)


def test_chunked_probabilities_and_given_pv_agree(setup, monkeypatch):
    head, fv, ft, _ = setup
    one = ft.select([1])
    pv = head.probs(fv.h, fv.lse)
    want = contributions(fv, one, head, pv=pv)
    widths = []
    real = Head.probs

    def probs(self, h, lse, cols=None):
        out = real(self, h, lse, cols)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(Head, "probs", probs)
    got = contributions(fv, one, head, chunk=5)
    assert widths and max(widths) <= 5  # never a whole |V|-wide row per token at once
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("max_pairs", [1, 2**24])  # one training sample per block, or all in one
def test_explanation_sums_labels_and_top_pairs(setup, tokenizer, texts, max_pairs):
    head, fv, ft, tokens = setup
    labels = token_labeler(tokenizer)
    expl = explain_rows(fv, ft, head, labels, pairs=7, max_pairs=max_pairs)
    exact = exact_scores(fv, ft, head, strategy="gram").mean(0)
    assert len(expl) == ft.n
    for j, e in enumerate(expl):
        assert e.total == pytest.approx(float(exact[j]), rel=1e-9, abs=1e-9)
        assert sum(t.contribution for t in e.query_tokens) == pytest.approx(e.total, rel=1e-9, abs=1e-9)
        assert sum(t.contribution for t in e.train_tokens) == pytest.approx(e.total, rel=1e-9, abs=1e-9)
        # the training tokens are the targets: with tokens="response", the response and EOS
        text = "".join(t.token for t in e.train_tokens)
        prompt, response = texts[3 + j]
        assert text == (response + "</s>" if tokens == "response" else prompt[1:] + response + "</s>")
        assert [t.position for t in e.train_tokens] == list(range(int(ft.lengths[j])))
        # query tokens: members in order, positions restart per member
        assert [t.sample for t in e.query_tokens] == fv.segment.tolist()
        assert [t.position for t in e.query_tokens if t.sample == 1] == list(range(int(fv.lengths[1])))
        # top pairs: the 7 largest |C| of the brute-force matrix, largest first
        C = reference_contributions(fv, ft.select([j]), head)
        want = C.flatten().abs().sort(descending=True).values[:7]
        got = [p.contribution for p in e.top_pairs]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64).abs(), want, atol=1e-10, rtol=1e-9)
        starts = fv.offsets.tolist()
        for p in e.top_pairs:
            k = starts[p.query_sample] + p.query_position
            assert p.contribution == pytest.approx(float(C[k, p.train_position]), rel=1e-9, abs=1e-12)
            assert p.query_token == e.query_tokens[k].token and p.train_token == e.train_tokens[p.train_position].token


def test_summarize_small_matrix_by_hand():
    C = torch.tensor([[1.0, -5.0], [2.0, 0.5]])
    e = summarize(C, ["a", "b"], [0, 0], [0, 1], ["x", "y"], pairs=3)
    assert [t.contribution for t in e.query_tokens] == [-4.0, 2.5]
    assert [t.contribution for t in e.train_tokens] == [3.0, -4.5]
    assert e.total == -1.5
    assert [(p.query_token, p.train_token, p.contribution) for p in e.top_pairs] == [
        ("a", "y", -5.0), ("b", "x", 2.0), ("a", "x", 1.0)]  # by |C|, the sign kept
    assert [(p.query_position, p.train_position) for p in e.top_pairs] == [(0, 1), (1, 0), (0, 0)]
    assert summarize(C, ["a", "b"], [0, 0], [0, 1], ["x", "y"], pairs=0).top_pairs == []


def test_contributions_explain_one_training_sample(setup):
    head, fv, ft, _ = setup
    with pytest.raises(ValueError, match="one training sample"):
        contributions(fv, ft, head)


# --- through an index ----------------------------------------------------------------------------------

QUERIES = [(s.prompt, s.response) for s in corpus(2, seed=5, prefix="q")]


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("n_queries", [1, 2])
def test_search_explanations_total_the_hit_scores(local_index, direction, n_queries):
    q = QUERIES[:n_queries]
    res = local_index.search(q, k=4, direction=direction, rerank=12, explain=3)
    plain = local_index.search(q, k=4, direction=direction, rerank=12)
    assert [h.id for h in res.hits] == [h.id for h in plain.hits]
    assert all(h.explanation is None for h in plain.hits)
    for h in res.hits:
        e = h.explanation
        assert e.total == pytest.approx(h.score, rel=1e-5, abs=1e-4)
        assert sum(t.contribution for t in e.train_tokens) == pytest.approx(h.score, rel=1e-5, abs=1e-4)
        assert len(e.top_pairs) == 3
        assert "".join(t.token for t in e.train_tokens) == h.metadata["response"] + "</s>"
        assert {t.sample for t in e.query_tokens} == set(range(n_queries))
    again = local_index.explain(q, [h.row for h in res.hits], pairs=3)
    assert again == [h.explanation for h in res.hits]


def test_explain_arguments_checked(local_index):
    with pytest.raises(ConfigError, match="explain must be >= 0"):
        local_index.search(QUERIES[:1], k=2, explain=-1)
    with pytest.raises(ConfigError, match="pairs must be >= 0"):
        local_index.explain(QUERIES[:1], [0], pairs=-1)
    assert local_index.explain(QUERIES[:1], [], pairs=2) == []
