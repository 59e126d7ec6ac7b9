"""For-Value scores from per-token features: exact, restricted-vocabulary and Emb variants.

For samples v and i with scored tokens k and k' (see forward.py),

    S(v, i) = <G_v, G_i>_F,   G = Σ_k (e_{y_k} − π_k) h_kᵀ   (|U| × d, U = the vocabulary, all of it
                                                              by default)
            = Σ_k Σ_k' <h_k, h_k'> · α_kk',
    α_kk'   = [y_k = y_k'] − π_k'(y_k) − π_k(y_k') + <π_k, π_k'>     (every term restricted to U).

Two exact strategies compute the same numbers; `scores` picks the cheaper for the shapes at hand:

- "pairs" (token-pair form): α and <h, h'> for blocks of token pairs, summed per sample pair. Costs
  ~Tv·Tt·(|U| + d); best when samples are short (few tokens per sample relative to d).
- "gram": G itself, one vocabulary chunk at a time, never all of it: Σ_chunks <G_v[c], G_i[c]>.
  Costs ~(Tv + Tt)·|U|·d + nv·nt·|U|·d; best when samples are long.

Probabilities are recomputed from h and lse one vocabulary chunk at a time (Head.probs), so memory
stays bounded by `memory_mb` whatever the corpus size. The Emb baseline sets α = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import ScoreConfig
from .features import Features, Head

# --------------------------------------------------------------------------------------------------
# References: G built explicitly. Small models only (|U|·d floats per sample).


def reference_G(feats: Features, head: Head, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """G_j = Σ_k (e_{y_k} − π_k)[U] h_kᵀ for every sample, by a plain loop → (n, |U|, d)."""
    out = []
    for j in range(feats.n):
        s, e = int(feats.offsets[j]), int(feats.offsets[j + 1])
        h = feats.h[s:e]
        pi = torch.softmax(head.logits(h), dim=-1)
        r = -pi
        r[torch.arange(e - s), feats.y[s:e]] += 1.0
        g = r.T @ h
        out.append(g if vocab is None else g[vocab])
    return torch.stack(out)


def reference_scores(fv: Features, ft: Features, head: Head, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """S = <G_v, G_i>_F from explicit G → (nv, nt)."""
    gv, gt = reference_G(fv, head, vocab), reference_G(ft, head, vocab)
    return gv.flatten(1) @ gt.flatten(1).T


# --------------------------------------------------------------------------------------------------
# Helpers


def segment_sum_rows(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Sums the rows of x (T, m) by segment id (T,) → (n, m)."""
    return torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seg.to(x.device), x)


def embedding_sums(feats: Features) -> torch.Tensor:
    """Σ_k h_k per sample → (n, d)."""
    return segment_sum_rows(feats.h, feats.segment, feats.n)


def target_vocab(*feats: Features) -> torch.Tensor:
    """Sorted unique target ids of the given features → (|U|,) int64."""
    return torch.unique(torch.cat([f.y for f in feats]))


def topk_vocab(feats: Features, head: Head, k: int, rows_per_step: int = 256) -> torch.Tensor:
    """Sorted union of the top-k predicted token ids over all rows of `feats` → (|U|,) int64."""
    ids = [torch.zeros(0, dtype=torch.long)]
    for a in range(0, feats.h.shape[0], rows_per_step):
        z = head.logits(feats.h[a : a + rows_per_step])
        ids.append(z.topk(min(k, z.shape[1]), dim=-1).indices.flatten())
    return torch.unique(torch.cat(ids))


def sample_blocks(feats: Features, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges [a, b) with at most max_tokens rows each (at least one sample)."""
    out, a = [], 0
    off = feats.offsets.tolist()
    while a < feats.n:
        b = a + 1
        while b < feats.n and off[b + 1] - off[a] <= max_tokens:
            b += 1
        out.append((a, b))
        a = b
    return out


def _probs_known(feats: Features) -> bool:
    """Whether `feats` carries its tokens' whole distributions (`Features.probs`) where its hidden states are."""
    return feats.probs is not None and feats.probs.device == feats.h.device


def _vocab_chunks(head: Head, vocab: torch.Tensor | None, chunk: int) -> list[slice | torch.Tensor]:
    if vocab is None:
        return [slice(c, min(c + chunk, head.vocab_size)) for c in range(0, head.vocab_size, chunk)]
    return list(torch.split(vocab, chunk))


def _onehot_positions(y: torch.Tensor, cols: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose target lies in cols, their column position inside cols)."""
    if isinstance(cols, slice):
        inside = (y >= cols.start) & (y < cols.stop)
        return inside.nonzero().squeeze(1), (y - cols.start)[inside]
    pos = torch.searchsorted(cols, y).clamp(max=cols.numel() - 1)
    inside = cols[pos] == y
    return inside.nonzero().squeeze(1), pos[inside]


def _in_vocab(ids: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    if vocab is None:
        return torch.ones_like(ids, dtype=torch.bool)
    pos = torch.searchsorted(vocab, ids).clamp(max=vocab.numel() - 1)
    return vocab[pos] == ids


# --------------------------------------------------------------------------------------------------
# Strategy "gram": vocabulary-chunked G.


def _residual(feats: Features, head: Head, cols: slice | torch.Tensor) -> torch.Tensor:
    """(e_y − π)[cols] for every token row → (T, c)."""
    r = -head.probs(feats.h, feats.lse, cols)
    rows, pos = _onehot_positions(feats.y, cols)
    r[rows, pos] += 1.0
    return r


def _padded(feats: Features) -> tuple[torch.Tensor, int]:
    """Flat row index of every token in an (n · Tmax) padded layout, and Tmax."""
    tmax = int(feats.lengths.max()) if feats.n else 0
    seg = feats.segment
    idx = seg * tmax + (torch.arange(feats.h.shape[0]) - feats.offsets[seg])
    return idx.to(feats.h.device), tmax


def gram_chunk(feats: Features, head: Head, cols: slice | torch.Tensor) -> torch.Tensor:
    """G[cols] of every sample, batched: Σ_k (e − π)[cols] h_kᵀ → (n, c, d)."""
    r = _residual(feats, head, cols)
    idx, tmax = _padded(feats)
    n, c, d = feats.n, r.shape[1], feats.h.shape[1]
    rp = torch.zeros(n * tmax, c, dtype=r.dtype, device=r.device)
    rp[idx] = r
    hp = torch.zeros(n * tmax, d, dtype=feats.h.dtype, device=feats.h.device)
    hp[idx] = feats.h
    return rp.view(n, tmax, c).transpose(1, 2) @ hp.view(n, tmax, d)


def scores_gram(fv: Features, ft: Features, head: Head, vocab: torch.Tensor | None = None,
                memory_mb: int = 1024) -> torch.Tensor:
    """Exact S over vocabulary U via G chunks → (nv, nt)."""
    budget = int(memory_mb * 2**20) // fv.h.element_size()
    d = head.dim
    nu = head.vocab_size if vocab is None else vocab.numel()
    tmax = max(int(fv.lengths.max()), int(ft.lengths.max()))
    # up to 128 samples per side and block (the S update is then a real matrix product); the
    # vocabulary chunk is as wide as lets both sides' G and padded residuals fit in half the budget
    vb = max(1, min(128, max(fv.n, ft.n)))
    chunk = max(1, min(nu, budget // (2 * 2 * vb * (d + tmax))))
    out = torch.zeros(fv.n, ft.n, dtype=fv.h.dtype, device=fv.h.device)
    t_blocks = [(a, min(a + vb, ft.n)) for a in range(0, ft.n, vb)]
    for va in range(0, fv.n, vb):
        vsel = fv.select(range(va, min(va + vb, fv.n)))
        tsel = [(a, b, ft.select(range(a, b))) for a, b in t_blocks]
        for cols in _vocab_chunks(head, vocab, chunk):
            gv = gram_chunk(vsel, head, cols).flatten(1)
            for a, b, ts in tsel:
                out[va : va + vsel.n, a:b] += gv @ gram_chunk(ts, head, cols).flatten(1).T
    return out


# --------------------------------------------------------------------------------------------------
# Strategy "pairs": token-pair form.


def pair_alpha(fv: Features, ft: Features, head: Head, vocab: torch.Tensor | None = None,
               pv: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """α_kk' for every (valuation token k, training token k') → (Tv, Tt).

    Args:
        pv: π of the valuation tokens over U (Tv, |U|), if already computed; else computed by chunks.
            The training tokens' π over the whole vocabulary is `ft.probs` when known (rerank.RowProbs: shared by
            the queries of a batcher pass), else computed by chunks.
    """
    a = (fv.y[:, None] == ft.y[None, :]).to(fv.h.dtype)
    if vocab is not None:
        a *= _in_vocab(fv.y, vocab).to(a.dtype)[:, None]
    # π_k'(y_k): logits of the training tokens at the valuation targets, and the converse
    pt_at_yv = torch.exp(head.logits(ft.h, fv.y) - ft.lse[:, None]).T
    pv_at_yt = torch.exp(head.logits(fv.h, ft.y) - fv.lse[:, None])
    a -= pt_at_yv * _in_vocab(fv.y, vocab).to(a.dtype)[:, None]
    a -= pv_at_yt * _in_vocab(ft.y, vocab).to(a.dtype)[None, :]
    known = _probs_known(ft)
    col0 = 0
    for cols in _vocab_chunks(head, vocab, chunk):
        pt = ft.probs[:, cols] if known else head.probs(ft.h, ft.lse, cols)
        a += (head.probs(fv.h, fv.lse, cols) if pv is None else pv[:, col0 : col0 + pt.shape[1]]) @ pt.T
        col0 += pt.shape[1]
    return a


def va_rows(feats: Features, a: int, b: int) -> slice:
    """Token rows of samples a..b-1 (contiguous in the flat layout)."""
    return slice(int(feats.offsets[a]), int(feats.offsets[b]))


def scores_pairs(fv: Features, ft: Features, head: Head, vocab: torch.Tensor | None = None,
                 memory_mb: int = 1024, pv_all: torch.Tensor | None = None) -> torch.Tensor:
    """Exact S over vocabulary U in the token-pair form → (nv, nt).

    Args:
        pv_all: π of every valuation token over U (Tv, |U|), when already computed (reused, not counted
            in the memory budget).
    """
    budget = int(memory_mb * 2**20) // fv.h.element_size()
    nu = head.vocab_size if vocab is None else vocab.numel()
    tv_all = fv.h.shape[0]
    # keep π of all valuation tokens when it takes at most a quarter of the budget (queries, small sets)
    cache_pv = pv_all is None and tv_all * nu <= budget // 4
    rest = budget - (tv_all * nu if cache_pv else 0)
    # blocks: Tv_b·Tt_b pair matrices (a few live at once) plus Tt_b·chunk probabilities
    side = max(1, int((rest // 6) ** 0.5))
    chunk = max(1, min(nu, side))
    out = torch.zeros(fv.n, ft.n, dtype=fv.h.dtype, device=fv.h.device)
    v_blocks = sample_blocks(fv, side)
    t_blocks = sample_blocks(ft, side)
    for va, vb in v_blocks:
        vs = fv.select(range(va, vb))
        pv = None
        if pv_all is not None:
            pv = pv_all[va_rows(fv, va, vb)]
        elif cache_pv:
            pv = torch.cat([head.probs(vs.h, vs.lse, c) for c in _vocab_chunks(head, vocab, chunk)], dim=1)
        vseg = vs.segment
        for ta, tb in t_blocks:
            ts = ft.select(range(ta, tb))
            m = (vs.h @ ts.h.T) * pair_alpha(vs, ts, head, vocab, pv, chunk)
            z = segment_sum_rows(m, vseg, vs.n)  # (nv_b, Tt_b)
            out[va:vb, ta:tb] = segment_sum_rows(z.T, ts.segment, ts.n).T
    return out


def self_scores(feats: Features, head: Head, chunk: int = 16384) -> torch.Tensor:
    """‖G_j‖² = S(j, j) of every sample → (n,), in the token-pair form over its own tokens only.

    Per sample: Σ_kk' <h_k, h_k'> · α_kk', α = [y_k = y_k'] − π_k'(y_k) − π_k(y_k') + <π_k, π_k'>; costs
    ~T_j²·|V| per sample (never a cross-sample pair), π computed `chunk` vocabulary columns at a time.
    """
    out = torch.zeros(feats.n, dtype=feats.h.dtype)
    for j in range(feats.n):
        rows = va_rows(feats, j, j + 1)
        h, y, lse = feats.h[rows], feats.y[rows], feats.lse[rows]
        if h.shape[0] == 0:
            continue
        py = torch.exp(head.logits(h, y) - lse[:, None])  # py[k, k'] = π_k(y_k')
        a = (y[:, None] == y[None, :]).to(h.dtype) - py - py.T
        for c0 in range(0, head.vocab_size, chunk):
            p = head.probs(h, lse, slice(c0, c0 + chunk))
            a += p @ p.T
        out[j] = ((h @ h.T) * a).sum()
    return out


def g_norms(feats: Features, head: Head) -> torch.Tensor:
    """‖G_j‖ of every sample → (n,): the square root of `self_scores` (rounding below 0 read as 0)."""
    return self_scores(feats, head).clamp(min=0).sqrt()


def unit_scale(norms: torch.Tensor) -> torch.Tensor:
    """1 / ‖G‖ of each row, 0 where ‖G‖ = 0 (a row of unit-normalised values: BuildConfig.normalize)."""
    return torch.where(norms > 0, 1.0 / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def mean_self_score(feats: Features, probs: torch.Tensor) -> torch.Tensor:
    """‖Ḡ‖² = mean over sample pairs (v, v') of S(v, v') of a group, from its tokens' distributions `probs`
    (T, |V|) → () : Σ_kk' <h_k, h_k'> · α_kk' / n² over every token pair of the group, α from probs alone
    (no pass over the head: the query's distributions are computed once per search). Costs T²·|V|."""
    py = probs[:, feats.y]  # py[k, k'] = π_k(y_k')
    a = (feats.y[:, None] == feats.y[None, :]).to(probs.dtype) - py - py.T + probs @ probs.T
    return ((feats.h @ feats.h.T) * a).sum() / max(feats.n, 1) ** 2


def group_norm(parts: Sequence[Features], head: Head, chunk: int = 4096) -> float:
    """‖Ḡ‖ of a group of samples given in parts, Ḡ = (1/n) Σ_v G_v, G_v = Σ_k (e_{y_k} − π_k) h_kᵀ.

    Σ_v G_v is Σ over every token of every part of (e_y − π) h^T: built `chunk` vocabulary columns at a time
    (a (chunk, d) block, summed over the parts), so the cost is (Σ T)·|V|·d and never n² sample pairs.
    """
    n = sum(f.n for f in parts)
    if n == 0:
        return 0.0
    total = 0.0
    for cols in _vocab_chunks(head, None, chunk):
        acc = sum(_residual(f, head, cols).T @ f.h for f in parts if f.n)
        total += float(acc.double().square().sum())
    return total ** 0.5 / n


# --------------------------------------------------------------------------------------------------
# Front door


def estimate_flops(fv: Features, ft: Features, vocab_size: int, dim: int) -> dict[str, float]:
    """Rough multiply-add counts of the two exact strategies."""
    tv, tt = fv.h.shape[0], ft.h.shape[0]
    return {
        "pairs": tv * tt * (vocab_size + dim + 4) + tv * vocab_size * dim,
        "gram": (tv + tt) * vocab_size * dim * 2 + fv.n * ft.n * vocab_size * dim,
    }


def exact_scores(fv: Features, ft: Features, head: Head, vocab: torch.Tensor | None = None,
                 strategy: str = "auto", memory_mb: int = 1024, pv: torch.Tensor | None = None) -> torch.Tensor:
    """S(v, i) over vocabulary U (all of it if None) → (nv, nt); the strategy only changes the cost.

    Args:
        pv: π of every valuation token over U (Tv, |U|), when already computed (used by "pairs").
    """
    if strategy == "auto" and _probs_known(ft):  # the training side's π is known: pairs costs Tv·Tt·|U|
        strategy = "pairs"
    if strategy == "auto":
        nu = head.vocab_size if vocab is None else vocab.numel()
        cost = estimate_flops(fv, ft, nu, head.dim)
        strategy = min(cost, key=cost.get)
    if strategy == "pairs":
        return scores_pairs(fv, ft, head, vocab, memory_mb, pv)
    return scores_gram(fv, ft, head, vocab, memory_mb)


def scores(fv: Features, ft: Features, head: Head, config: ScoreConfig = ScoreConfig(),
           shared_vocab: torch.Tensor | None = None) -> torch.Tensor:
    """For-Value of every training sample (ft) to every valuation sample (fv) → (nv, nt).

    Args:
        shared_vocab: the fixed vocabulary for method "shared" (default: training targets).
    """
    if config.method == "emb":
        return embedding_sums(fv) @ embedding_sums(ft).T
    if config.method == "exact":
        S = exact_scores(fv, ft, head, None, config.strategy, config.memory_mb)
        if config.normalize == "unit":
            S = S * unit_scale(g_norms(ft, head)).to(S.dtype)[None, :]
        return S
    if config.method == "shared":
        vocab = shared_vocab if shared_vocab is not None else target_vocab(ft)
        return exact_scores(fv, ft, head, vocab, config.strategy, config.memory_mb)
    b = config.inbatch_size
    v_parts = [(a, fv.select(range(a, min(a + b, fv.n)))) for a in range(0, fv.n, b)]
    v_vocab = [topk_vocab(p, head, config.inbatch_topk) for _, p in v_parts]
    out = torch.zeros(fv.n, ft.n, dtype=fv.h.dtype, device=fv.h.device)
    for a in range(0, ft.n, b):
        tb = ft.select(range(a, min(a + b, ft.n)))
        t_vocab = topk_vocab(tb, head, config.inbatch_topk)
        for (va, vp), vv in zip(v_parts, v_vocab):
            vocab = vv[torch.isin(vv, t_vocab)]
            if vocab.numel():
                out[va : va + vp.n, a : a + tb.n] = exact_scores(vp, tb, head, vocab, config.strategy, config.memory_mb)
    return out
