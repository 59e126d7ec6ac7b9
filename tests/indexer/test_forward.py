"""The forward pass: captured features equal the model's own hidden states and probabilities."""

from __future__ import annotations

import pytest
import torch

from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import encode, extract_features


def _reference_tokens(model, tokenizer, prompt, response, tokens):
    """Single-sample pass with the real lm_head: (h, probs, targets) at the scored positions."""
    enc = encode(tokenizer, prompt, response, ForwardConfig(tokens=tokens))
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # Llama's last hidden state is taken after the final norm: the lm_head input
    h = out.hidden_states[-1][0, enc.score_from : len(enc.ids) - 1]
    p = torch.softmax(out.logits[0, enc.score_from : len(enc.ids) - 1].double(), -1)
    return h, p, torch.tensor(enc.ids[enc.score_from + 1 :])


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_features_match_model_outputs(model64, tokenizer, texts, tokens):
    cfg = ForwardConfig(tokens=tokens, dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    f = extract_features(model64, tokenizer, texts, cfg)
    assert f.n == len(texts)
    for j, (p, r) in enumerate(texts):
        h, probs, y = _reference_tokens(model64, tokenizer, p, r, tokens)
        s, e = int(f.offsets[j]), int(f.offsets[j + 1])
        torch.testing.assert_close(f.h[s:e], h, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(head.probs(f.h[s:e], f.lse[s:e]), probs, atol=1e-10, rtol=1e-10)
        assert torch.equal(f.y[s:e], y)


def test_scored_positions(tokenizer, texts):
    p, r = texts[0]
    n_prompt = len(tokenizer(p)["input_ids"])
    n_resp = len(tokenizer(r, add_special_tokens=False)["input_ids"])
    resp = encode(tokenizer, p, r, ForwardConfig(tokens="response"))
    full = encode(tokenizer, p, r, ForwardConfig(tokens="all"))
    assert len(resp.ids) - 1 - resp.score_from == n_resp + 1  # response tokens + EOS
    assert resp.ids[-1] == tokenizer.eos_token_id
    assert len(full.ids) - 1 - full.score_from == n_prompt + n_resp


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_tokens", [1, 40, 100000])
def test_independent_of_batching_and_padding(model64, tokenizer, texts, padding_side, batch_tokens):
    ref = extract_features(model64, tokenizer, texts, ForwardConfig(dtype=torch.float64, batch_tokens=1))
    got = extract_features(
        model64, tokenizer, texts,
        ForwardConfig(dtype=torch.float64, batch_tokens=batch_tokens, padding_side=padding_side),
    )
    torch.testing.assert_close(got.h, ref.h, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-10, rtol=1e-10)
    assert torch.equal(got.y, ref.y) and torch.equal(got.offsets, ref.offsets)


def test_fp32_batching_close(model32, tokenizer, texts):
    ref = extract_features(model32, tokenizer, texts, ForwardConfig(batch_tokens=1))
    got = extract_features(model32, tokenizer, texts, ForwardConfig(batch_tokens=10**6, padding_side="left"))
    torch.testing.assert_close(got.h, ref.h, atol=1e-4, rtol=1e-4)


def test_truncation_keeps_response(tokenizer):
    cfg = ForwardConfig(max_length=8)
    enc = encode(tokenizer, "a long prompt here ->", " ok", cfg)
    assert len(enc.ids) == 8 and enc.truncated
    assert enc.ids[-1] == tokenizer.eos_token_id
    assert len(enc.ids) - 1 - enc.score_from == len(" ok") + 1


def test_concurrent_passes_on_one_model_are_safe(model64, tokenizer, texts):
    """Threads sharing a model get the same features as one thread (the head swap is serialised)."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = ForwardConfig(dtype=torch.float64, batch_tokens=16)
    ref = extract_features(model64, tokenizer, texts, cfg)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: extract_features(model64, tokenizer, texts, cfg), range(8)))
    for got in outs:
        torch.testing.assert_close(got.h, ref.h, atol=1e-10, rtol=1e-10)
    assert model64.get_output_embeddings().__class__.__name__ == "Linear"
