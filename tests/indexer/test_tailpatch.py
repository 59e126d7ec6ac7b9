"""Tests of forvalue.indexer.tailpatch: the functional step against a real Adam step, and its causal sign."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.tailpatch import (TopLayers, answer_logprob, response_loss, response_token_logprobs,
                                       tail_patch, tail_patch_reference)
from forvalue.indexer.features import ForwardConfig
from forvalue.indexer.forward import encode
from tests.factories import make_model, make_tokenizer

TRAIN = [("Alvor was born in", " Velmora"), ("The sky above is", " blue and wide"),
         ("Brenna plays the", " oboe"), ("Count to three:", " 1 2 3")]
QUERIES = [("Q: Where was Alvor born? A:", " Velmora"), ("Q: What does Brenna play? A:", " oboe")]


@pytest.fixture(scope="module")
def tiny():
    return make_model(seed=0), make_tokenizer()


def test_matches_a_real_adam_step_per_pair(tiny):
    model, tok = tiny
    pairs = [(0, 0), (1, 0), (2, 1), (0, 1), (3, 1)]
    fast = tail_patch(model, tok, TRAIN, QUERIES, pairs, lr=1e-3, query_batch=1)
    ref = tail_patch_reference(model, tok, TRAIN, QUERIES, pairs, lr=1e-3)
    assert fast.shape == (5,) and fast.abs().max() > 1e-4  # the steps do move the answers
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-5)


def test_leaves_the_model_unchanged(tiny):
    model, tok = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    tail_patch(model, tok, TRAIN, QUERIES, [(0, 0), (1, 1)], lr=1e-2)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_row_stating_the_fact_raises_the_answer_more_than_an_unrelated_row(seed):
    model, tok = make_model(seed=seed), make_tokenizer()
    d = tail_patch(model, tok, TRAIN, QUERIES, [(0, 0), (1, 0), (3, 0), (2, 1), (1, 1), (3, 1)], lr=1e-2)
    assert d[0] > 0 and d[0] > d[1] and d[0] > d[2]
    assert d[3] > 0 and d[3] > d[4] and d[3] > d[5]


def test_answer_logprob_and_loss_are_consistent(tiny):
    model, tok = tiny
    lp = answer_logprob(model, tok, QUERIES)
    assert lp.shape == (2,) and (lp < 0).all()
    # the loss of one row is minus the mean log-prob over its response tokens and EOS
    n_tokens = len(tok(TRAIN[2][1], add_special_tokens=False)["input_ids"]) + 1
    with torch.no_grad():
        loss = response_loss(model, tok, [TRAIN[2]])
    with torch.no_grad():
        tlp, rows = response_token_logprobs(model, tok, [TRAIN[2]], add_eos=True)
    assert tlp.shape == (n_tokens,) and rows.tolist() == [0] * n_tokens
    assert float(loss) == pytest.approx(-float(tlp.sum()) / n_tokens)
    with pytest.raises(ValueError, match="lr"):
        tail_patch(model, tok, TRAIN, QUERIES, [(0, 0)], lr=0)


def test_log_probs_by_hand(tiny):
    """The fast path's log-probabilities are those of a plain full pass over each row, position by position."""
    model, tok = tiny
    rows_in = QUERIES + TRAIN[:2]
    with torch.no_grad():
        lp, rows = response_token_logprobs(model, tok, rows_in)
        for j, (p, r) in enumerate(rows_in):
            e = encode(tok, p, r, ForwardConfig(tokens="response", add_eos=False))
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0].float(), -1)
            want = torch.stack([logp[k, e.ids[k + 1]] for k in range(e.score_from, len(e.ids) - 1)])
            assert len(want) > 0
            torch.testing.assert_close(lp[rows == j], want, rtol=1e-5, atol=1e-5)


def test_top_layers_run_from_cached_states_as_the_full_model_does():
    model, tok = make_model(seed=3, layers=3, tie=True), make_tokenizer()
    top = TopLayers(model, 2)
    with torch.no_grad():
        full, rows = response_token_logprobs(model, tok, TRAIN + QUERIES, add_eos=True)
        cut, rows_cut = response_token_logprobs(model, tok, TRAIN + QUERIES, add_eos=True, top=top)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
    assert torch.equal(rows, rows_cut)
    assert len(model.get_decoder().layers) == 3  # the view is undone


def test_top_layer_step_matches_a_real_adam_step_over_those_layers():
    model, tok = make_model(seed=4, layers=3), make_tokenizer()
    pairs = [(0, 0), (1, 0), (2, 1), (3, 1)]
    fast = tail_patch(model, tok, TRAIN, QUERIES, pairs, lr=1e-3, top=TopLayers(model, 1))
    ref = tail_patch_reference(model, tok, TRAIN, QUERIES, pairs, lr=1e-3, top_layers=1)
    every = tail_patch_reference(model, tok, TRAIN, QUERIES, pairs, lr=1e-3)
    assert fast.abs().max() > 1e-4
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(fast, every, rtol=1e-3, atol=1e-5)  # the frozen layers were not stepped


def test_top_layers_train_only_their_weights():
    model, tok = make_model(seed=5, layers=3), make_tokenizer()
    top = TopLayers(model, 1)
    top.freeze()
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(top.parameters(), lr=1e-2)
    with torch.enable_grad():
        loss = response_loss(model, tok, TRAIN, top=top)
        loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(n.startswith(("model.layers.2.", "model.norm.")) for n in moved)
    with pytest.raises(ValueError, match="top layers"):
        TopLayers(model, 4)
