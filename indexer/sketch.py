"""Structure-aware linear sketches of G = Σ_k (e_{y_k} − π_k) h_kᵀ for the index's first stage.

The sketch of a sample is R G Pᵀ, flattened (m · r values):

    P  (r, d)  the top-r uncentered principal directions of the corpus' hidden states (hidden states are
               low-rank: a few dozen directions hold nearly all their energy);
    R  (m, |V|) a signed bucketing of the vocabulary: the tokens that carry most of G's mass in the
               corpus (targets and predicted tokens) get a bucket each, the long tail is hashed with
               random signs into the remaining buckets.

Both maps are fitted once per index from (a sample of) the corpus and stored with it. The sketch is
linear in G, so the sketch of a group is the mean of its members' sketches, and the inner product of two
sketches estimates <G_v, G_i>: exactly when R and P are identities (tested), closely for the tokens that
matter otherwise. The first stage only has to put the exact top-k among its top-C candidates; the exact
re-ranking (score.py) gives the final answer.

`bucket_residuals` computes R(e − π) for every token in one pass over the vocabulary, fused with the
log-partition, so sketching costs no second pass over the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from .config import SketchConfig
from .features import Features, Head


MAP_FILES = ("projection.npy", "vocab_bucket.npy", "vocab_sign.npy")  # the maps' arrays in an index


@dataclass(frozen=True)
class Sketcher:
    """Fitted sketch maps.

    Attributes:
        projection: (r, d) orthonormal rows P.
        bucket: (V,) int64 bucket of every vocabulary id.
        sign: (V,) ±1 sign of every vocabulary id.
        buckets: m.
    """

    projection: torch.Tensor
    bucket: torch.Tensor
    sign: torch.Tensor
    buckets: int

    @property
    def dim(self) -> int:
        return self.projection.shape[0] * self.buckets

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Sketcher:
        """The same maps on `device` (projection and signs also in `dtype` when given)."""
        return Sketcher(self.projection.to(device, dtype), self.bucket.to(device), self.sign.to(device, dtype),
                        self.buckets)

    def arrays(self) -> dict[str, np.ndarray]:
        """The maps as the arrays an index stores (MAP_FILES): projection, vocabulary buckets and signs."""
        return {"projection.npy": self.projection.float().numpy(),
                "vocab_bucket.npy": self.bucket.numpy().astype(np.int64),
                "vocab_sign.npy": self.sign.float().numpy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], buckets: int) -> Sketcher:
        """The maps from the arrays `arrays()` gave (read back from an index)."""
        return cls(torch.from_numpy(np.array(arrays["projection.npy"])),
                   torch.from_numpy(np.array(arrays["vocab_bucket.npy"])).long(),
                   torch.from_numpy(np.array(arrays["vocab_sign.npy"])), buckets)

    def sketch(self, feats: Features, head: Head, chunk: int = 16384, probs: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Sketches of every sample of `feats` → (n, m · r).

        Args:
            probs: π of every token row over the whole vocabulary (T, V), when already computed (a query's):
                then no pass over the vocabulary is made.
        """
        if probs is None:
            _, r = bucket_residuals(feats.h, feats.y, head, self.bucket, self.sign, self.buckets, chunk)
        else:
            r = torch.zeros(probs.shape[0], self.buckets, dtype=probs.dtype)
            r.index_add_(1, self.bucket, probs * -self.sign.to(probs.dtype))
            r[torch.arange(r.shape[0]), self.bucket[feats.y]] += self.sign[feats.y].to(probs.dtype)
        return sketch_from_residuals(feats, r, self.projection)


@dataclass(frozen=True)
class TopProbs:
    """The heaviest entries of each token's next-token distribution π, and the size of the rest.

    Attributes:
        ids: (T, m) int64 vocabulary ids of the m largest probabilities, largest first.
        probs: (T, m) those probabilities.
        tail_l2: (T,) ‖π restricted to the other ids‖₂, summed directly (no cancellation).
    """

    ids: torch.Tensor
    probs: torch.Tensor
    tail_l2: torch.Tensor


def bucket_residuals(h: torch.Tensor, y: torch.Tensor, head: Head, bucket: torch.Tensor, sign: torch.Tensor,
                     m: int, chunk: int = 16384, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """log-partition and R(e_y − π) for every row, in one pass over the vocabulary (see `vocab_pass`).

    Returns:
        lse (T,), residuals (T, m).
    """
    p = vocab_pass(h, y, head, bucket, sign, m, 0, chunk, rows)
    return p.lse, p.res


class VocabPass(NamedTuple):
    """What one pass over the vocabulary gives (`vocab_pass`).

    Attributes:
        lse: (T,) log-partition of every row.
        res: (T, m) bucketed residuals R(e_y − π) of every row.
        top: the top probabilities of every row, or None when none were asked for.
        g_sq: (n,) ‖G_j‖² of every sample when `offsets` were given, else None.
    """

    lse: torch.Tensor
    res: torch.Tensor
    top: TopProbs | None
    g_sq: torch.Tensor | None


def _row_blocks(T: int, rows: int, offsets: torch.Tensor | None) -> list[tuple[int, int, list[int]]]:
    """Blocks of about `rows` rows: (first row, end row, the local starts of the samples in it + its size).

    With offsets the blocks hold whole samples (a sample longer than `rows` is a block of its own), so each
    sample's Gram matrix is accumulated within one block.
    """
    if offsets is None:
        return [(a, min(a + rows, T), []) for a in range(0, T, rows)]
    bounds = offsets.tolist()
    blocks, a, cuts = [], bounds[0], [0]
    for end in bounds[1:]:
        if end - a > rows and cuts[-1] > 0:  # close the block before this sample
            blocks.append((a, a + cuts[-1], cuts))
            a, cuts = a + cuts[-1], [0]
        cuts = cuts + [end - a]
    if cuts[-1] > 0:
        blocks.append((a, a + cuts[-1], cuts))
    return blocks


class _SampleGrams:
    """Per sample of a row block, the Gram matrix Σ_v p_kv p_k'v of its rows' exponentials, accumulated
    chunk by chunk (rescaled with the running maxima) in one batched product over the samples padded to
    the longest; padded rows are zero and add nothing."""

    def __init__(self, cuts: list[int], dtype: torch.dtype, device: torch.device) -> None:
        lens = [e - s for s, e in zip(cuts[:-1], cuts[1:])]
        L = max(max(lens), 1)
        R = cuts[-1]
        self.index = torch.full((len(lens), L), R, dtype=torch.long)     # row R: the zero pad row
        for j, (s, n) in enumerate(zip(cuts[:-1], lens)):
            self.index[j, :n] = torch.arange(s, s + n)
        self.index = self.index.to(device)
        self.mask = self.index < R                                        # (n_s, L) real rows
        self.gram = torch.zeros(len(lens), L, L, dtype=dtype, device=device)

    def _pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(R, ...) → (n_s, L, ...): each sample's rows, padded with `fill`."""
        pad = torch.full((1, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        return torch.cat([x, pad])[self.index]

    def add(self, z: torch.Tensor, scale: torch.Tensor) -> None:
        """Rescale by scale_k scale_k' and add this chunk's Σ_v z_kv z_k'v."""
        sc = self._pad(scale, 1.0)
        zp = self._pad(z)
        self.gram.mul_(sc[:, :, None] * sc[:, None, :]).baddbmm_(zp, zp.transpose(1, 2))

    def squared_norms(self, h: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, f: torch.Tensor, head: Head
                      ) -> torch.Tensor:
        """‖G_j‖² = Σ_kk' <h_k, h_k'> α_kk', α = [y_k = y_k'] − π_k(y_k') − π_k'(y_k) + <π_k, π_k'> → (n_s,)."""
        hp, yp, lp, fp = self._pad(h), self._pad(y), self._pad(lse), self._pad(f)
        # py[j, k, k'] = π_k(y_k') within sample j: logits of h_k at the sample's targets
        z = torch.bmm(hp, head.weight[yp].transpose(1, 2))
        if head.bias is not None:
            z = z + head.bias[yp][:, None, :]
        py = torch.exp(head._post(z) - lp[:, :, None])
        alpha = (yp[:, :, None] == yp[:, None, :]).to(h.dtype) - py - py.transpose(1, 2)
        alpha += self.gram * (fp[:, :, None] * fp[:, None, :])
        pair = self.mask[:, :, None] & self.mask[:, None, :]
        return (torch.bmm(hp, hp.transpose(1, 2)) * alpha * pair).sum((1, 2))


def vocab_pass(h: torch.Tensor, y: torch.Tensor, head: Head, bucket: torch.Tensor, sign: torch.Tensor, m: int,
               top: int = 0, chunk: int = 16384, rows: int = 512, offsets: torch.Tensor | None = None
               ) -> VocabPass:
    """log-partition, R(e_y − π), (optionally) the top-`top` probabilities of every row and (optionally) the
    squared norm ‖G_j‖² of every sample, in one pass over the vocabulary.

    The π-part is accumulated relative to a running maximum of the logits (as in an online softmax) and
    rescaled by exp(max − lse) at the end, so each vocabulary chunk's logits are computed once. Signs are
    folded into 2m accumulators (positive and negative half) so the exponentials are scattered as they
    are, in place, without a signed copy; rows are processed in blocks to bound the temporaries.
    The top entries are merged chunk by chunk; every entry that cannot (or can no longer) be among them
    goes into the tail's sum of squares as it is seen, so the tail norm is a direct sum, not the
    difference of two nearly equal numbers.
    ‖G_j‖² = Σ_kk' <h_k, h_k'> <e_{y_k} − π_k, e_{y_k'} − π_k'> over the sample's own tokens: the Gram
    <π_k, π_k'> is accumulated (rescaled like the rest) from the same exponentials, so the norms cost no
    second pass over the logits (`score.self_scores` is the two-pass reference).
    Every tensor stays on h's device: on a GPU nothing |V|-wide leaves it.

    Args:
        h: (T, d) hidden states; y: (T,) targets; bucket, sign: (V,) the vocabulary map on h's device;
            m: buckets.
        top: probabilities kept per row (0 = none).
        offsets: (n + 1,) row offsets of the samples (Features.offsets), to also compute ‖G_j‖².
    """
    T, dev, dt = h.shape[0], h.device, h.dtype
    top = min(top, head.vocab_size)
    signed = bucket + m * (sign < 0).long()               # (V,) index into the 2m accumulators
    lse = torch.empty(T, dtype=dt, device=dev)
    res = torch.empty(T, m, dtype=dt, device=dev)
    top_ids = torch.empty(T, top, dtype=torch.long, device=dev)
    top_p = torch.empty(T, top, dtype=dt, device=dev)
    tail_l2 = torch.empty(T, dtype=dt, device=dev)
    g_sq = None if offsets is None else torch.zeros(offsets.numel() - 1, dtype=dt, device=dev)
    sample = 0
    for a, b, cuts in _row_blocks(T, rows, offsets):
        hb = h[a:b]
        R = b - a
        gram = None if g_sq is None else _SampleGrams(cuts, dt, dev)
        run_max = torch.full((R,), -math.inf, dtype=dt, device=dev)
        total = torch.zeros(R, dtype=dt, device=dev)               # Σ exp(z − run_max)
        acc = torch.zeros(R, 2 * m, dtype=dt, device=dev)          # Σ exp(z − run_max), by signed bucket
        pool_v = torch.empty(R, 0, dtype=dt, device=dev)           # top candidates, exp(z − run_max)
        pool_i = torch.empty(R, 0, dtype=torch.long, device=dev)
        tail2 = torch.zeros(R, dtype=dt, device=dev)               # Σ exp(2(z − run_max)) outside the pool
        for c0 in range(0, head.vocab_size, chunk):
            cols = slice(c0, min(c0 + chunk, head.vocab_size))
            z = head.logits(hb, cols)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            scale = torch.exp(run_max - new_max)
            z.sub_(new_max[:, None]).exp_()
            total = total * scale + z.sum(1)
            acc.mul_(scale[:, None])
            acc.index_add_(1, signed[cols], z)
            if gram is not None:
                gram.add(z, scale)
            if top:
                cv, ci = z.topk(min(top, z.shape[1]), dim=1)
                z.scatter_(1, ci, 0.0)
                tail2 = tail2 * scale * scale + z.square_().sum(1)
                pool_v = torch.cat([pool_v * scale[:, None], cv], dim=1)
                pool_i = torch.cat([pool_i, ci + c0], dim=1)
                if pool_v.shape[1] > top:
                    keep_v, pos = pool_v.topk(top, dim=1)
                    tail2 += pool_v.scatter(1, pos, 0.0).square_().sum(1)   # the dropped ones
                    pool_v, pool_i = keep_v, pool_i.gather(1, pos)
            run_max = new_max
        lse[a:b] = run_max + torch.log(total)
        f = torch.exp(run_max - lse[a:b])
        res[a:b] = (acc[:, m:] - acc[:, :m]) * f[:, None]
        if top:
            order = torch.argsort(pool_v, dim=1, descending=True)
            top_p[a:b] = pool_v.gather(1, order) * f[:, None]
            top_ids[a:b] = pool_i.gather(1, order)
            tail_l2[a:b] = tail2.clamp(min=0).sqrt() * f
        if gram is not None:
            n_s = len(cuts) - 1
            g_sq[sample : sample + n_s] = gram.squared_norms(hb, y[a:b], lse[a:b], f, head)
            sample += n_s
    res[torch.arange(T, device=dev), bucket[y]] += sign[y]
    return VocabPass(lse, res, TopProbs(top_ids, top_p, tail_l2) if top else None, g_sq)


def sketch_from_residuals(feats: Features, residuals: torch.Tensor, projection: torch.Tensor,
                          rows_per_step: int = 2048) -> torch.Tensor:
    """Σ_k r_k ⊗ (P h_k) per sample, flattened bucket-major → (n, m · r)."""
    hp = feats.h @ projection.T                                   # (T, r)
    m, r = residuals.shape[1], hp.shape[1]
    seg = feats.segment.to(feats.h.device)
    out = torch.zeros(feats.n, m * r, dtype=feats.h.dtype, device=feats.h.device)
    for a in range(0, hp.shape[0], rows_per_step):
        b = min(a + rows_per_step, hp.shape[0])
        outer = (residuals[a:b, :, None] * hp[a:b, None, :]).reshape(b - a, m * r)
        out.index_add_(0, seg[a:b], outer)
    return out


def reference_sketch(feats: Features, head: Head, sketcher: Sketcher) -> torch.Tensor:
    """R G Pᵀ built from explicit G, sample by sample (tests only: |V|·d per sample)."""
    from .score import reference_G

    G = reference_G(feats, head)                                  # (n, V, d)
    R = torch.zeros(sketcher.buckets, head.vocab_size, dtype=G.dtype)
    R[sketcher.bucket, torch.arange(head.vocab_size)] = sketcher.sign.to(G.dtype)
    return torch.stack([(R @ g @ sketcher.projection.T).flatten() for g in G])


def fit_projection(h: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` eigenvectors of hᵀh (uncentered PCA), as rows → (r, d)."""
    rank = min(rank, h.shape[1])
    cov = (h.T.double() @ h.double())
    _, vecs = torch.linalg.eigh(cov)                               # ascending eigenvalues
    return vecs[:, -rank:].flip(1).T.contiguous().to(h.dtype)


def token_mass(feats: Features, head: Head, chunk: int = 16384) -> torch.Tensor:
    """Σ_k |e_{y_k} − π_k| per vocabulary id over the fit sample: where G's rows carry weight → (V,)."""
    mass = torch.zeros(head.vocab_size, dtype=torch.float64, device=feats.h.device)
    for c0 in range(0, head.vocab_size, chunk):
        cols = slice(c0, min(c0 + chunk, head.vocab_size))
        mass[cols] += head.probs(feats.h, feats.lse, cols).sum(0).double()
    # at a target the residual is 1 − π(y); elsewhere π: add the target counts and remove 2π(y) there
    p_y = torch.exp(head.target_logits(feats.h, feats.y) - feats.lse).double()
    mass.index_add_(0, feats.y, 1.0 - 2.0 * p_y)
    return mass


def fit_sketcher(feats: Features, head: Head, config: SketchConfig) -> Sketcher:
    """Fits P and R on the features of a sample of the corpus (on their device; the maps come back on the host)."""
    V = head.vocab_size
    projection = fit_projection(feats.h, config.rank).cpu()
    if projection.shape[0] < config.rank:  # d < rank: pad with zero rows so the dim stays rank · buckets
        pad = torch.zeros(config.rank - projection.shape[0], projection.shape[1], dtype=projection.dtype)
        projection = torch.cat([projection, pad])
    m, e = config.buckets, min(config.n_dedicated, V)
    g = torch.Generator().manual_seed(config.seed)
    sign = (torch.randint(0, 2, (V,), generator=g) * 2 - 1).to(feats.h.dtype)
    if e >= V:
        bucket = torch.randperm(V, generator=g) % m if V > m else torch.arange(V)
        if V <= m:
            sign = torch.ones(V, dtype=feats.h.dtype)
        return Sketcher(projection, bucket.long(), sign, m)
    heavy = torch.argsort(token_mass(feats, head), descending=True, stable=True)[:e].cpu()
    tail_buckets = m - e
    if tail_buckets > 0:
        bucket = e + torch.randint(0, tail_buckets, (V,), generator=g)
    else:  # no tail buckets: the tail shares the dedicated ones
        bucket = torch.randint(0, max(m, 1), (V,), generator=g)
    bucket[heavy] = torch.arange(e)
    sign[heavy] = 1.0
    return Sketcher(projection, bucket.long(), sign, m)
