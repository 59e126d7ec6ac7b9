"""Causal check of an attribution (tail-patch): one optimiser step on a training row, then how much the
log-probability of a query's answer changed.

For a model with weights θ, a training row z and a query q with answer a,

    Δ(z, q) = log p_{θ'}(a | q) − log p_θ(a | q),   θ' = θ − lr · m̂ / (√v̂ + ε),

θ' being one step of a fresh Adam(W) on the mean cross-entropy of z's response tokens (and EOS), i.e. the
fine-tuning recipe's update with batch size 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + ε) per
weight. Weight decay is left out (it moves every row's patch the same way). A row that taught the model
the answer should give a large Δ. Following TrackStar (Chang et al. 2024) this measures whether retrieved
rows actually change the model's answer, not whether they state it.

`tail_patch` evaluates the patched weights through `torch.func.functional_call` (no copy of the model, no
restore), one step per distinct training row, with every query that needs that row in one batch;
`tail_patch_reference` runs a real `torch.optim.Adam` step on a copy of the model per (row, query) pair.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .features import ForwardConfig, pad_batch
from .forward import encode

ADAM_EPS = 1e-8


def _encode_all(tokenizer, pairs: Sequence[tuple[str, str]], add_eos: bool) -> list:
    cfg = ForwardConfig(tokens="response", add_eos=add_eos)
    return [encode(tokenizer, p, r, cfg) for p, r in pairs]


def response_token_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], add_eos: bool = False,
                            params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every response token (and EOS with add_eos) given the prompt, one padded pass.

    Args:
        params: weights to run with instead of the model's own (torch.func.functional_call).

    Returns:
        (lp (B, L-1), mask (B, L-1)): lp[j, p] = log π(ids[p + 1] | ids[:p + 1]) of row j, mask 1 on the
        positions predicting a response token.
    """
    enc = _encode_all(tokenizer, pairs, add_eos)
    seqs = [e.ids for e in enc]
    ids, att, _ = pad_batch(seqs, "right")
    device = next(model.parameters()).device
    ids, att = ids.to(device), att.to(device)
    kw = dict(input_ids=ids, attention_mask=att, use_cache=False)
    out = functional_call(model, params, args=(), kwargs=kw) if params is not None else model(**kw)
    logits = out.logits[:, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(lp)
    for j, e in enumerate(enc):
        mask[j, e.score_from : len(e.ids) - 1] = 1.0
    return lp, mask


def answer_logprob(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                   params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """log p(response | prompt) summed over the response tokens (no EOS) of every pair → (B,) float64."""
    with torch.no_grad():
        lp, mask = response_token_logprobs(model, tokenizer, pairs, add_eos=False, params=params)
    return (lp * mask).sum(1).double().cpu()


def response_loss(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens and EOS of a batch of pairs (the fine-tuning loss)."""
    lp, mask = response_token_logprobs(model, tokenizer, pairs, add_eos=True)
    return -(lp * mask).sum() / mask.sum()


def adam_first_step(params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor | None], lr: float
                    ) -> dict[str, torch.Tensor]:
    """θ − lr · g / (|g| + ε) for every weight: the first step of a fresh Adam (bias-corrected m̂ = g, v̂ = g²)."""
    out = {}
    for (name, p), g in zip(params.items(), grads):
        if g is None:
            out[name] = p
            continue
        step = g.abs().add_(ADAM_EPS)  # one buffer per weight, updated in place: 135M-weight models step often
        torch.div(g, step, out=step)
        out[name] = step.mul_(-lr).add_(p)
    return out


def tail_patch(model: nn.Module, tokenizer, train: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str]],
               pairs: Sequence[tuple[int, int]], lr: float, query_batch: int = 64) -> torch.Tensor:
    """Δ log p(answer | question) after one Adam step on a training row, for every (row, query) pair.

    Args:
        train: training rows (prompt, response); the step's loss is `response_loss` of the one row.
        queries: (question, answer) pairs.
        pairs: (training row index, query index) pairs to measure; each distinct row is stepped once.
        lr: the step's learning rate (the fine-tuning recipe's).

    Returns:
        (len(pairs),) float64 changes, in the order of `pairs`.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not pairs:
        return torch.zeros(0, dtype=torch.float64)
    was_training = model.training
    model.eval()  # dropout off: the step and the measurement are deterministic
    params = {n: p.detach() for n, p in model.named_parameters()}
    needed = sorted({q for _, q in pairs})
    before = torch.zeros(len(queries), dtype=torch.float64)
    for a in range(0, len(needed), query_batch):
        sel = needed[a : a + query_batch]
        before[sel] = answer_logprob(model, tokenizer, [queries[q] for q in sel])
    by_row: dict[int, list[int]] = {}
    for r, q in pairs:
        by_row.setdefault(r, []).append(q)
    delta: dict[tuple[int, int], float] = {}
    try:
        for r, qs in by_row.items():
            qs = sorted(set(qs))
            with torch.enable_grad():
                trainable = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                loss = -_masked_mean(*response_token_logprobs(model, tokenizer, [train[r]], add_eos=True,
                                                              params=trainable))
                grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
            patched = adam_first_step(params, grads, lr)
            del grads, trainable
            for a in range(0, len(qs), query_batch):
                sel = qs[a : a + query_batch]
                after = answer_logprob(model, tokenizer, [queries[q] for q in sel], params=patched)
                for q, v in zip(sel, after.tolist()):
                    delta[(r, q)] = v - float(before[q])
    finally:
        model.train(was_training)
    return torch.tensor([delta[(r, q)] for r, q in pairs], dtype=torch.float64)


def _masked_mean(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (lp * mask).sum() / mask.sum()


def tail_patch_reference(model: nn.Module, tokenizer, train: Sequence[tuple[str, str]],
                         queries: Sequence[tuple[str, str]], pairs: Sequence[tuple[int, int]], lr: float
                         ) -> torch.Tensor:
    """`tail_patch` by a plain loop: a copy of the model and a real torch.optim.Adam step per pair."""
    out = []
    for r, q in pairs:
        m = copy.deepcopy(model).eval()
        before = answer_logprob(m, tokenizer, [queries[q]])[0]
        opt = torch.optim.Adam(m.parameters(), lr=lr, eps=ADAM_EPS)
        with torch.enable_grad():
            opt.zero_grad()
            response_loss(m, tokenizer, [train[r]]).backward()
        opt.step()
        out.append(float(answer_logprob(m, tokenizer, [queries[q]])[0] - before))
    return torch.tensor(out, dtype=torch.float64)
