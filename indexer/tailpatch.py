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

`TopLayers` is the recipe that trains only the top n decoder layers and the final norm (the embeddings, the
tied head and the layers below frozen). The frozen layers' output for a sequence never changes, so it is
computed once per sequence and the forward and backward passes run the top layers alone, with the head
applied only at the scored positions: fine-tuning and tail-patch then cost about n / depth of the full
recipe's passes, which is what lets the fact-tracing benchmark run on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from .features import ForwardConfig, pad_batch
from .forward import encode

ADAM_EPS = 1e-8


class TopLayers:
    """The top `n` decoder layers and the final norm of a causal LM as its only trainable part.

    The layers below are frozen, so the hidden state entering layer depth − n is a function of the token ids
    alone: `states` computes it once per sequence (a full forward pass) and keeps it. `view` makes the decoder
    run the top layers only, from those states; `trainable` names the trained weights as the view spells them.
    Works on decoders with `layers` and `norm` (Llama, Qwen2, Mistral and their kin).
    """

    def __init__(self, model: nn.Module, n: int):
        decoder = model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "norm"):
            raise ValueError(f"{type(model).__name__}: top-layer training needs a decoder with layers and norm")
        if not 1 <= n <= len(layers):
            raise ValueError(f"top layers must be 1..{len(layers)}, got {n}")
        self.model, self.decoder, self.n, self.start = model, decoder, n, len(layers) - n
        self._states: dict[tuple[int, ...], torch.Tensor] = {}
        self._keep = {id(p) for m in (*layers[self.start:], decoder.norm) for p in m.parameters()}

    def parameters(self) -> list[nn.Parameter]:
        """The trained weights (the model's own tensors)."""
        return [p for p in self.model.parameters() if id(p) in self._keep]

    def freeze(self) -> None:
        """requires_grad on the trained weights only (for an optimiser over `parameters()`)."""
        for p in self.model.parameters():
            p.requires_grad_(id(p) in self._keep)

    @contextmanager
    def view(self) -> Iterator[None]:
        """The decoder runs its top n layers alone (inputs_embeds = `states`) inside the block."""
        full = self.decoder.layers
        self.decoder.layers = nn.ModuleList(list(full)[self.start:])
        try:
            yield
        finally:
            self.decoder.layers = full

    def trainable(self) -> dict[str, torch.Tensor]:
        """The trained weights by their names in the decoder's `view` (call inside it), detached."""
        return {n: p.detach() for n, p in self.decoder.named_parameters() if id(p) in self._keep}

    def states(self, seqs: Sequence[Sequence[int]], batch: int = 32) -> list[torch.Tensor]:
        """The hidden state entering layer `start` of every sequence → [(len, d)], computed once per sequence."""
        todo = sorted({tuple(q) for q in seqs if tuple(q) not in self._states})
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for a in range(0, len(todo), batch):
                part = todo[a : a + batch]
                ids, att, _ = pad_batch(part, "right")
                out = self.model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False,
                                 output_hidden_states=True)
                h = out.hidden_states[self.start]
                for j, q in enumerate(part):
                    self._states[q] = h[j, : len(q)].clone()
        return [self._states[tuple(q)] for q in seqs]


def _encode_all(tokenizer, pairs: Sequence[tuple[str, str]], add_eos: bool) -> list:
    cfg = ForwardConfig(tokens="response", add_eos=add_eos)
    return [encode(tokenizer, p, r, cfg) for p, r in pairs]


def response_token_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], add_eos: bool = False,
                            params: dict[str, torch.Tensor] | None = None, top: TopLayers | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every response token (and EOS with add_eos) given the prompt, one padded pass.

    Args:
        params: weights to run with instead of the model's own (torch.func.functional_call): names of the
            model's, or with `top` names of its `trainable()` view.
        top: run the top layers alone from their cached input states (`TopLayers`).

    Returns:
        (lp (N,), row (N,)): the log-probability of each response token, flattened row by row, and its row.
    """
    enc = _encode_all(tokenizer, pairs, add_eos)
    seqs = [e.ids for e in enc]
    rows = torch.cat([torch.full((len(e.ids) - 1 - e.score_from,), j, dtype=torch.long) for j, e in enumerate(enc)])
    pos = torch.cat([torch.arange(e.score_from, len(e.ids) - 1) for e in enc])
    ids, att, _ = pad_batch(seqs, "right")
    device = next(model.parameters()).device
    ids, att, rows, pos = ids.to(device), att.to(device), rows.to(device), pos.to(device)
    target = ids[rows, pos + 1]
    if top is None:
        kw = dict(input_ids=ids, attention_mask=att, use_cache=False)
        out = functional_call(model, params, args=(), kwargs=kw) if params is not None else model(**kw)
        logits = out.logits[rows, pos].float()
    else:
        states = top.states(seqs)
        x = torch.zeros(len(seqs), ids.shape[1], states[0].shape[-1], dtype=states[0].dtype, device=device)
        for j, h in enumerate(states):
            x[j, : len(h)] = h
        kw = dict(inputs_embeds=x, attention_mask=att, use_cache=False)
        with top.view():
            dec = top.decoder
            out = functional_call(dec, params, args=(), kwargs=kw) if params is not None else dec(**kw)
        logits = model.get_output_embeddings()(out.last_hidden_state[rows, pos]).float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    return lp, rows


def answer_logprob(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                   params: dict[str, torch.Tensor] | None = None, top: TopLayers | None = None) -> torch.Tensor:
    """log p(response | prompt) summed over the response tokens (no EOS) of every pair → (B,) float64."""
    with torch.no_grad():
        lp, rows = response_token_logprobs(model, tokenizer, pairs, add_eos=False, params=params, top=top)
    return torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, rows.cpu(), lp.double().cpu())


def response_loss(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], top: TopLayers | None = None,
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the response tokens and EOS of a batch of pairs (the fine-tuning loss)."""
    lp, _ = response_token_logprobs(model, tokenizer, pairs, add_eos=True, params=params, top=top)
    return -lp.mean()


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
               pairs: Sequence[tuple[int, int]], lr: float, query_batch: int = 64, top: TopLayers | None = None
               ) -> torch.Tensor:
    """Δ log p(answer | question) after one Adam step on a training row, for every (row, query) pair.

    Args:
        train: training rows (prompt, response); the step's loss is `response_loss` of the one row.
        queries: (question, answer) pairs.
        pairs: (training row index, query index) pairs to measure; each distinct row is stepped once.
        lr: the step's learning rate (the fine-tuning recipe's).
        top: step only the weights the recipe trains (`TopLayers`); None: every weight.

    Returns:
        (len(pairs),) float64 changes, in the order of `pairs`.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not pairs:
        return torch.zeros(0, dtype=torch.float64)
    was_training = model.training
    model.eval()  # dropout off: the step and the measurement are deterministic
    if top is None:
        params = {n: p.detach() for n, p in model.named_parameters()}
    else:
        with top.view():
            params = top.trainable()
    needed = sorted({q for _, q in pairs})
    before = torch.zeros(len(queries), dtype=torch.float64)
    for a in range(0, len(needed), query_batch):
        sel = needed[a : a + query_batch]
        before[sel] = answer_logprob(model, tokenizer, [queries[q] for q in sel], top=top)
    by_row: dict[int, list[int]] = {}
    for r, q in pairs:
        by_row.setdefault(r, []).append(q)
    delta: dict[tuple[int, int], float] = {}
    try:
        for r, qs in by_row.items():
            qs = sorted(set(qs))
            with torch.enable_grad():
                trainable = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                loss = response_loss(model, tokenizer, [train[r]], top=top, params=trainable)
                grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
            patched = adam_first_step(params, grads, lr)
            del grads, trainable
            for a in range(0, len(qs), query_batch):
                sel = qs[a : a + query_batch]
                after = answer_logprob(model, tokenizer, [queries[q] for q in sel], params=patched, top=top)
                for q, v in zip(sel, after.tolist()):
                    delta[(r, q)] = v - float(before[q])
    finally:
        model.train(was_training)
    return torch.tensor([delta[(r, q)] for r, q in pairs], dtype=torch.float64)


def tail_patch_reference(model: nn.Module, tokenizer, train: Sequence[tuple[str, str]],
                         queries: Sequence[tuple[str, str]], pairs: Sequence[tuple[int, int]], lr: float,
                         top_layers: int | None = None) -> torch.Tensor:
    """`tail_patch` by a plain loop: a copy of the model and a real torch.optim.Adam step per pair, over every
    weight or (top_layers) over the top layers and the final norm only, with full forward passes."""
    out = []
    for r, q in pairs:
        m = copy.deepcopy(model).eval()
        before = answer_logprob(m, tokenizer, [queries[q]])[0]
        if top_layers is None:
            weights = list(m.parameters())
        else:
            dec = m.get_decoder()
            weights = [p for layer in dec.layers[len(dec.layers) - top_layers:] for p in layer.parameters()]
            weights += list(dec.norm.parameters())
        opt = torch.optim.Adam(weights, lr=lr, eps=ADAM_EPS)
        with torch.enable_grad():
            opt.zero_grad()
            response_loss(m, tokenizer, [train[r]]).backward()
        opt.step()
        out.append(float(answer_logprob(m, tokenizer, [queries[q]])[0] - before))
    return torch.tensor(out, dtype=torch.float64)
