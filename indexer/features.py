"""What a forward pass computes, and the pieces the text pass (forward.py) and the vision pass (vision.py) share.

At every scored position k a pass records

    h_k   the input of the output embedding (lm_head), i.e. the final hidden state after the last norm,
    y_k   the token that position k predicts,
    lse_k log Σ_v exp(logit_kv), so that π_k = exp(W h_k + b − lse_k) can be recomputed in fp32 for any
          slice of the vocabulary without ever holding a |V|-wide row per token.

Here: `ForwardConfig` (how samples are batched and run), `Head` (the unembedding), `Features` (the records,
ragged by sample), the capture of lm_head's input (a pass-through swapped in for the duration of a pass, under
the model's lock), length-bucketed batch plans, padding, and the gather of the scored positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import CPU_MAX_BATCH, TOKEN_SCOPES, BuildConfig
from .errors import ConfigError, ModelError


@dataclass(frozen=True)
class ForwardConfig:
    """How samples are tokenised, batched and run.

    Attributes:
        tokens: which positions are scored. "response": the positions predicting the response tokens
            and the appended EOS. "all": every position of prompt + response (each predicts the next token).
        batch_tokens: budget of padded tokens per batch (batch size × longest sequence in it).
        max_batch: most samples per batch.
        max_length: longest token sequence; longer samples lose prompt tokens from the left first, then
            response tokens from the right (counted in `Features.truncated`).
        add_eos: append the tokenizer's EOS token after the response.
        padding_side: "right" or "left"; results do not depend on it (tested), it exists for that test.
        dtype: dtype of the returned features and of the probability computations (float32 or float64).
        logits_chunk: vocabulary columns per chunk when computing lse (bounds memory per batch).
        on_device: return the features on the model's device instead of the host: an index build sketches
            them there (on a GPU nothing |V|-wide, and no per-token feature it does not store, reaches the host).
        probs_bytes: keep every scored token's whole next-token distribution (`Features.probs`), from the
            logits the log-partition is computed from, when a batch's fit in this many bytes; 0 = never. A
            search needs them (sketch, bounds, exact scores): kept, they cost no second pass over the head.
    """

    tokens: str = "response"
    batch_tokens: int = 8192
    max_batch: int = CPU_MAX_BATCH
    max_length: int = 2048
    add_eos: bool = True
    padding_side: str = "right"
    dtype: torch.dtype = torch.float32
    logits_chunk: int = 16384
    on_device: bool = False
    probs_bytes: int = 0

    @classmethod
    def of_build(cls, build: BuildConfig) -> ForwardConfig:
        """The passes of an index build (`build`: its token scope, max_length and batch sizes)."""
        return cls(tokens=build.tokens, max_length=build.max_length, batch_tokens=build.batch_tokens,
                   max_batch=build.max_batch)

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_SCOPES:
            raise ConfigError(f"tokens must be one of {TOKEN_SCOPES}, got {self.tokens!r}")
        if self.batch_tokens < 1 or self.max_batch < 1 or self.max_length < 2 or self.logits_chunk < 1:
            raise ConfigError("batch_tokens, max_batch and logits_chunk must be >= 1 and max_length >= 2")
        if self.probs_bytes < 0:
            raise ConfigError(f"probs_bytes must be >= 0 (0 = keep no distributions), got {self.probs_bytes}")
        if self.padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")


@contextlib.contextmanager
def tf32_matmul() -> Iterator[None]:
    """CUDA float32 matrix products on TF32 tensor cores within the block (`Head.tf32` says when exact)."""
    flags = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32") if hasattr(flags, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, previous)


@dataclass(frozen=True)
class Head:
    """The unembedding, in the compute dtype: logits = scale · softcap(W h + b).

    Attributes:
        weight: (V, d) output-embedding matrix.
        bias: (V,) or None.
        scale: multiplier applied to the logits (Cohere's logit_scale, 1/Granite's logits_scaling).
        softcap: final logit soft-capping c (Gemma 2): logits = c · tanh(logits / c); None if absent.
        tf32: the weights are those of a half-precision (bfloat16/float16) model. Its hidden states are half
            values too, and a half value has at most 10 mantissa bits, so a TF32 product of the two is exact
            (up to fp32 accumulation order): on a GPU the logits then use TF32 tensor cores instead of plain
            float32 arithmetic, several times faster, with the same result.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    tf32: bool = False

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def from_model(cls, model: nn.Module, dtype: torch.dtype = torch.float32) -> Head:
        """Reads the output embedding of a transformers causal LM (or VLM) and its logit post-processing."""
        with model_lock(model):  # never while a pass has swapped it out
            out = model.get_output_embeddings()
        if out is None or not hasattr(out, "weight"):
            raise ModelError(f"{type(model).__name__} has no output embedding (lm_head); not a causal LM")
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        scale = 1.0
        if getattr(text_cfg, "logit_scale", None) not in (None, 1.0):
            scale = float(text_cfg.logit_scale)
        if getattr(text_cfg, "logits_scaling", None) not in (None, 1.0):
            scale = 1.0 / float(text_cfg.logits_scaling)
        softcap = getattr(text_cfg, "final_logit_softcapping", None)
        bias = getattr(out, "bias", None)
        return cls(
            weight=out.weight.detach().to(dtype),
            bias=None if bias is None else bias.detach().to(dtype),
            scale=scale,
            softcap=float(softcap) if softcap else None,
            tf32=out.weight.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32,
        )

    def logits(self, h: torch.Tensor, cols: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Logits of `h` (T, d) for the vocabulary columns `cols` (all if None) → (T, c)."""
        w = self.weight if cols is None else self.weight[cols]
        if self.tf32 and h.is_cuda:
            with tf32_matmul():
                z = h @ w.T
        else:
            z = h @ w.T
        if self.bias is not None:
            z = z + (self.bias if cols is None else self.bias[cols])
        return self._post(z)

    def target_logits(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row-wise logit of token ids[t] at h[t]: (T, d), (T,) → (T,)."""
        z = (h * self.weight[ids]).sum(-1)
        if self.bias is not None:
            z = z + self.bias[ids]
        return self._post(z)

    def _post(self, z: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.scale != 1.0:
            z = z * self.scale
        return z

    def logsumexp(self, h: torch.Tensor, chunk: int = 16384, keep: torch.Tensor | None = None) -> torch.Tensor:
        """log Σ_v exp(logit_v) for each row of h (T, d) → (T,), over vocabulary chunks (`keep`: a (T, V)
        tensor that receives the logits, when the caller wants them too)."""
        acc = torch.full((h.shape[0],), -math.inf, dtype=h.dtype, device=h.device)
        for c0 in range(0, self.vocab_size, chunk):
            z = self.logits(h, slice(c0, c0 + chunk))
            if keep is not None:
                keep[:, c0 : c0 + z.shape[1]] = z
            acc = torch.logaddexp(acc, torch.logsumexp(z, dim=-1))
        return acc

    def logsumexp_probs(self, h: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """(`logsumexp(h, chunk)`, the distributions exp(logits − lse) (T, V)) from one pass over the head."""
        z = torch.empty(h.shape[0], self.vocab_size, dtype=h.dtype, device=h.device)
        lse = self.logsumexp(h, chunk, keep=z)
        return lse, z.sub_(lse[:, None]).exp_()

    def probs(self, h: torch.Tensor, lse: torch.Tensor, cols: slice | torch.Tensor | None = None) -> torch.Tensor:
        """π restricted to `cols` (not renormalised): exp(logits − lse), (T, d), (T,) → (T, c)."""
        return torch.exp(self.logits(h, cols) - lse[:, None])

    def to(self, device: torch.device | str) -> Head:
        return dataclasses.replace(
            self, weight=self.weight.to(device), bias=None if self.bias is None else self.bias.to(device)
        )


@dataclass
class Features:
    """Per-token features of n samples, flat: sample j owns rows offsets[j]:offsets[j+1].

    Attributes:
        h: (T, d) unembedding inputs at the scored positions.
        y: (T,) int64 target token ids.
        lse: (T,) log-partition of the logits at each scored position.
        offsets: (n + 1,) int64 row offsets.
        cut: per sample, whether it was shortened to max_length (empty: not recorded, none cut).
        probs: (T, V) every scored position's next-token distribution, when the pass kept them
            (ForwardConfig.probs_bytes); None otherwise (recomputed from h and lse where needed).
    """

    h: torch.Tensor
    y: torch.Tensor
    lse: torch.Tensor
    offsets: torch.Tensor
    cut: tuple[bool, ...] = ()
    probs: torch.Tensor | None = None

    @property
    def truncated(self) -> int:
        """How many samples were shortened to max_length."""
        return sum(self.cut)

    @property
    def cut_samples(self) -> list[int]:
        """The samples (0..n-1) shortened to max_length: their scores value what the model saw, not the rest."""
        return [j for j, c in enumerate(self.cut) if c]

    @property
    def n(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def segment(self) -> torch.Tensor:
        """(T,) sample index of every token row."""
        return torch.repeat_interleave(torch.arange(self.n, device=self.offsets.device), self.lengths)

    def to(self, device: torch.device | str) -> Features:
        """The same features with h, y and lse on `device` (offsets stay on the host)."""
        return Features(self.h.to(device), self.y.to(device), self.lse.to(device), self.offsets, self.cut,
                        None if self.probs is None else self.probs.to(device))

    def select(self, idx: Sequence[int] | torch.Tensor) -> Features:
        """The features of samples `idx`, in that order (views of these tensors for a `range` of step 1)."""
        if isinstance(idx, range) and idx.step == 1 and 0 <= idx.start <= idx.stop <= self.n:
            a, b = int(self.offsets[idx.start]), int(self.offsets[idx.stop])
            return Features(self.h[a:b], self.y[a:b], self.lse[a:b], self.offsets[idx.start : idx.stop + 1] - a,
                            self.cut[idx.start : idx.stop] if self.cut else (),
                            None if self.probs is None else self.probs[a:b])
        rows, offsets = self.token_index(idx)
        cut = tuple(self.cut[int(j)] for j in torch.as_tensor(idx, dtype=torch.long).tolist()) if self.cut else ()
        return Features(self.h[rows], self.y[rows], self.lse[rows], offsets, cut,
                        None if self.probs is None else self.probs[rows.to(self.probs.device)])

    def token_index(self, idx: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows of samples `idx`, in that order; their offsets): what `select` gathers."""
        return token_rows(self.offsets, idx)

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        if not parts:
            raise ValueError("concat needs at least one Features")
        lens = torch.cat([p.lengths for p in parts])
        offsets = torch.zeros(lens.numel() + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        return Features(
            torch.cat([p.h for p in parts]), torch.cat([p.y for p in parts]), torch.cat([p.lse for p in parts]),
            offsets, tuple(c for p in parts for c in (p.cut or (False,) * p.n)),
            torch.cat([p.probs for p in parts]) if all(p.probs is not None for p in parts) else None,
        )


def token_rows(offsets: torch.Tensor, idx: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For samples with token row `offsets` (n + 1,): (the token rows of samples `idx`, in that order; the
    offsets of those samples in that order)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    lens = (offsets[1:] - offsets[:-1])[idx]
    out = torch.zeros(idx.numel() + 1, dtype=torch.long)
    out[1:] = torch.cumsum(lens, 0)
    # row r of the result comes from offsets[idx[j]] + (r - out[j]) for the j that owns r
    shift = torch.repeat_interleave(offsets[:-1][idx] - out[:-1], lens)
    return torch.arange(int(out[-1])) + shift, out


_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises forvalue's passes through `model` and reads of its output embedding."""
    with _LOCKS_LOCK:
        return model.__dict__.setdefault("_forvalue_pass_lock", threading.RLock())


class _PassThrough(nn.Module):
    """Stands in for lm_head during a pass: records its input and returns it unchanged (no |V| logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.captured = x
        return x


@contextlib.contextmanager
def capture_unembedding_input(model: nn.Module) -> Iterator[_PassThrough]:
    """Within the block, model(...) skips its lm_head and the head's input is in `.captured`.

    The swap changes the model object, so passes through it are serialised (one lock per model): two
    threads sharing a model never see each other's pass-through.
    """
    with model_lock(model):
        head = model.get_output_embeddings()
        probe = _PassThrough()
        model.set_output_embeddings(probe)
        try:
            yield probe
        finally:
            model.set_output_embeddings(head)


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Length-bucketed batches: sample indices sorted by length (longest first), filled to the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_batch(seqs: Sequence[Sequence[int]], padding_side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token id sequences → (ids (B, L), attention mask (B, L), where each sequence starts in its row)."""
    L = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    starts = []
    for j, q in enumerate(seqs):
        s = L - len(q) if padding_side == "left" else 0
        ids[j, s : s + len(q)] = torch.tensor(q)
        mask[j, s : s + len(q)] = 1
        starts.append(s)
    return ids, mask, starts


def scored_features(hidden: torch.Tensor, seqs: Sequence[Sequence[int]], positions: Sequence[torch.Tensor],
                    starts: Sequence[int], head: Head, config: ForwardConfig, with_lse: bool, cut: Sequence[bool]
                    ) -> Features:
    """The features of the scored positions of a padded pass, in batch order.

    Args:
        hidden: (B, L, d) lm_head inputs of the pass. seqs: each row's token ids (unpadded).
        positions: per row, the scored positions in its unpadded sequence; position p predicts seqs[j][p + 1].
        starts: where each sequence starts in its padded row (`pad_batch`).
    """
    device = hidden.device
    assert hidden.shape[:2] == (len(seqs), max(len(q) for q in seqs))
    rows_b = [torch.full_like(p, j) for j, p in enumerate(positions)]
    rows_p = [p + s for p, s in zip(positions, starts)]
    y = torch.cat([torch.tensor(q, dtype=torch.long)[p + 1] for q, p in zip(seqs, positions)]).to(device)
    h = hidden[torch.cat(rows_b).to(device), torch.cat(rows_p).to(device)].to(config.dtype)
    probs = None
    if not with_lse:
        lse = torch.full_like(y, math.nan, dtype=h.dtype)
    elif h.shape[0] * head.vocab_size * h.element_size() <= config.probs_bytes:
        lse, probs = head.logsumexp_probs(h, config.logits_chunk)
    else:
        lse = head.logsumexp(h, config.logits_chunk)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([p.numel() for p in positions]), 0)
    if config.on_device:
        return Features(h, y, lse, offsets, tuple(cut), probs)
    return Features(h.cpu(), y.cpu(), lse.cpu(), offsets, tuple(cut), None if probs is None else probs.cpu())
