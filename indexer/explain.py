"""Token-level attribution of For-Value scores: which (query token, training token) pairs make a score.

For a query group of nv samples (one sample: nv = 1) with scored tokens k and one training sample with
scored tokens k', the group score (the mean over its members) splits exactly into token pairs:

    S(v, i) = Σ_k Σ_k' C[k, k'],   C[k, k'] = <h_k, h_k'> · α_kk' / nv,
    α_kk'   = [y_k = y_k'] − π_k'(y_k) − π_k(y_k') + <π_k, π_k'>,

each member's tokens weighted 1/nv. Row sums of C are the contributions of the query tokens, column sums
those of the training tokens; both sum to S, and so does C. A token is labelled by the text of its target
y (the token that position predicts) and its position among its sample's scored tokens, so the stored
training features (h, y, lse per token) are all an explanation needs.

Memory: C is (Tv, Tt) for one training sample at a time; the probabilities behind <π_k, π_k'> are
computed one vocabulary chunk at a time (`score.pair_alpha`), never a (Tv, Tt, |V|) array. The reference
`reference_contributions` loops over token pairs with full softmaxes (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .features import Features, Head
from .results import Explanation, PairContribution, TokenContribution
from .score import pair_alpha, sample_blocks


def contributions(fv: Features, ft: Features, head: Head, pv: torch.Tensor | None = None,
                  chunk: int = 4096) -> torch.Tensor:
    """C[k, k'] = <h_k, h_k'> · α_kk' / nv for the query group `fv` and ONE training sample `ft` → (Tv, Tt).

    Args:
        fv: the query group's features (nv samples, Tv tokens).
        ft: one training sample's features (Tt tokens).
        pv: π of the query tokens over the whole vocabulary (Tv, |V|), when already computed.
        chunk: vocabulary columns per step for <π_k, π_k'> (memory ~ (Tv + Tt) · chunk).

    Raises:
        ValueError: `ft` holds more or fewer than one sample, or `fv` none.
    """
    if ft.n != 1:
        raise ValueError(f"contributions explains one training sample at a time, got {ft.n}")
    if fv.n < 1:
        raise ValueError("contributions needs at least one query sample")
    return (fv.h @ ft.h.T) * pair_alpha(fv, ft, head, None, pv, chunk) / fv.n


def reference_contributions(fv: Features, ft: Features, head: Head) -> torch.Tensor:
    """C by a plain loop over token pairs with full softmaxes (small models only) → (Tv, Tt)."""
    assert ft.n == 1
    pv = torch.softmax(head.logits(fv.h), dim=-1)
    pt = torch.softmax(head.logits(ft.h), dim=-1)
    out = torch.zeros(fv.h.shape[0], ft.h.shape[0], dtype=fv.h.dtype)
    for k in range(fv.h.shape[0]):
        for k2 in range(ft.h.shape[0]):
            yk, yk2 = int(fv.y[k]), int(ft.y[k2])
            alpha = float(yk == yk2) - pt[k2, yk] - pv[k, yk2] + pv[k] @ pt[k2]
            out[k, k2] = (fv.h[k] @ ft.h[k2]) * alpha / fv.n
    return out


def positions(feats: Features) -> tuple[list[int], list[int]]:
    """(sample index, position among that sample's scored tokens) of every token row."""
    seg = feats.segment
    pos = torch.arange(feats.h.shape[0]) - feats.offsets[seg]
    return seg.tolist(), pos.tolist()


def summarize(C: torch.Tensor, query_labels: Sequence[str], query_samples: Sequence[int],
              query_positions: Sequence[int], train_labels: Sequence[str], pairs: int) -> Explanation:
    """An Explanation from a contribution matrix C (Tv, Tt): row and column sums, the top-`pairs` by |C|.

    Sums are taken in float64. Ties in |C| keep the row-major order.
    """
    c = C.double()
    rows, cols = c.sum(1).tolist(), c.sum(0).tolist()
    tt = C.shape[1]
    flat = c.flatten()
    top = torch.argsort(flat.abs(), descending=True, stable=True)[: max(0, pairs)].tolist()
    return Explanation(
        query_tokens=[TokenContribution(query_labels[k], query_positions[k], rows[k], query_samples[k])
                      for k in range(C.shape[0])],
        train_tokens=[TokenContribution(train_labels[k], k, cols[k]) for k in range(tt)],
        top_pairs=[PairContribution(query_positions[f // tt], f % tt, query_labels[f // tt], train_labels[f % tt],
                                    float(flat[f]), query_samples[f // tt]) for f in top],
        total=float(c.sum()),
    )


def explain_rows(fv: Features, ft: Features, head: Head, labels: Callable[[torch.Tensor], list[str]],
                 pairs: int = 10, pv: torch.Tensor | None = None, max_pairs: int = 2**24) -> list[Explanation]:
    """One Explanation per training sample of `ft` for the query group `fv`.

    Training samples are taken in blocks of about `max_pairs` / Tv tokens (at least one sample), so that
    the probabilities and pair terms of a block are a few large products rather than many small ones; each
    sample's C is its columns of the block's.

    Args:
        labels: target ids (T,) → their texts (e.g. `token_labeler(tokenizer)`).
        pairs: top pairs to keep per training sample (>= 0).
        pv: π of the query tokens over the whole vocabulary (Tv, |V|), when already computed.
        max_pairs: (query token, training token) pairs per block (memory: a few (Tv, block) arrays).
    """
    if fv.n < 1:
        raise ValueError("explain_rows needs at least one query sample")
    q_labels = labels(fv.y)
    q_samples, q_pos = positions(fv)
    out = []
    for a, b in sample_blocks(ft, max(1, max_pairs // max(1, fv.h.shape[0]))):
        block = ft.select(range(a, b))
        C = (fv.h @ block.h.T) * pair_alpha(fv, block, head, None, pv) / fv.n
        off = block.offsets.tolist()
        t_labels = labels(block.y)
        for j in range(block.n):
            out.append(summarize(C[:, off[j] : off[j + 1]], q_labels, q_samples, q_pos,
                                 t_labels[off[j] : off[j + 1]], pairs))
    return out


def token_labeler(tokenizer) -> Callable[[torch.Tensor], list[str]]:
    """ids (T,) → the decoded text of each token on its own (special tokens kept), cached per id."""
    cache: dict[int, str] = {}

    def labels(ids: torch.Tensor) -> list[str]:
        out = []
        for i in ids.tolist():
            text = cache.get(i)
            if text is None:
                text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                cache[i] = text
            out.append(text)
        return out

    return labels
