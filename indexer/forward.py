"""Model → per-token features: the unembedding input h_k, the target y_k and log Σ exp(logits_k).

One forward pass over a set of (prompt, response) samples, batched by a token budget over
length-sorted samples, gives for every scored position k

    h_k   the input of the output embedding (lm_head), i.e. the final hidden state after the last norm,
    y_k   the token that position k predicts,
    lse_k log Σ_v exp(logit_kv), so that π_k = exp(W h_k + b − lse_k) can be recomputed in fp32 for any
          slice of the vocabulary without ever holding a |V|-wide row per token.

The input of lm_head is captured by swapping the output-embedding module for a pass-through for the
duration of the pass, so it is exactly what the head sees, whatever the architecture does before it.
Positions are given explicitly (cumsum of the attention mask), so results do not depend on the padding
side or on which samples share a batch.
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

from .config import CPU_MAX_BATCH, TOKEN_SCOPES
from .errors import ConfigError, ModelError

# Batch budget on a CPU: larger batches only add padding and cache misses there.
CPU_BATCH_TOKENS = 4096
# Samples per batch on a GPU (short samples then fill a batch by count, not tokens).
GPU_MAX_BATCH = 1024


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

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_SCOPES:
            raise ConfigError(f"tokens must be one of {TOKEN_SCOPES}, got {self.tokens!r}")
        if self.batch_tokens < 1 or self.max_batch < 1 or self.max_length < 2 or self.logits_chunk < 1:
            raise ConfigError("batch_tokens, max_batch and logits_chunk must be >= 1 and max_length >= 2")
        if self.padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")


@contextlib.contextmanager
def _tf32_matmul() -> Iterator[None]:
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
            with _tf32_matmul():
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

    def logsumexp(self, h: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """log Σ_v exp(logit_v) for each row of h (T, d) → (T,), over vocabulary chunks."""
        acc = torch.full((h.shape[0],), -math.inf, dtype=h.dtype, device=h.device)
        for c0 in range(0, self.vocab_size, chunk):
            acc = torch.logaddexp(acc, torch.logsumexp(self.logits(h, slice(c0, c0 + chunk)), dim=-1))
        return acc

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
        truncated: number of samples shortened to max_length.
    """

    h: torch.Tensor
    y: torch.Tensor
    lse: torch.Tensor
    offsets: torch.Tensor
    truncated: int = 0

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
        return Features(self.h.to(device), self.y.to(device), self.lse.to(device), self.offsets, self.truncated)

    def select(self, idx: Sequence[int] | torch.Tensor) -> Features:
        """The features of samples `idx`, in that order."""
        rows, offsets = self.token_index(idx)
        return Features(self.h[rows], self.y[rows], self.lse[rows], offsets)

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
            offsets, sum(p.truncated for p in parts),
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


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample: ids = prompt ids + response ids (+ EOS); positions ≥ score_from are scored."""

    ids: list[int]
    score_from: int
    truncated: bool = False


def encode(tokenizer, prompt: str, response: str, config: ForwardConfig) -> Encoded:
    """Tokenises prompt and response separately (a clean boundary) and picks the scored positions.

    Position p predicts ids[p + 1]; with tokens="response" the scored positions are those predicting a
    response token or the EOS, with tokens="all" every position but the last.
    """
    p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not p_ids and tokenizer.bos_token_id is not None:
        p_ids = [tokenizer.bos_token_id]
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if config.add_eos and tokenizer.eos_token_id is not None:
        r_ids.append(tokenizer.eos_token_id)
    truncated = False
    over = len(p_ids) + len(r_ids) - config.max_length
    if over > 0:
        truncated = True
        cut = min(over, max(len(p_ids) - 1, 0))  # keep at least one prompt token to predict from
        p_ids = p_ids[cut:]
        over -= cut
        if over > 0:
            r_ids = r_ids[: len(r_ids) - over]
    ids = p_ids + r_ids
    if len(ids) < 2:
        raise ValueError("a sample needs at least two tokens (prompt + response) to score a position")
    score_from = 0 if config.tokens == "all" else max(len(p_ids) - 1, 0)
    return Encoded(ids, score_from, truncated)


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


def tokens_for_memory(free_bytes: int, per_token_bytes: float, reserve_bytes: int, fraction: float = 0.7,
                      lo: int = 256, hi: int = 1 << 18) -> int:
    """Padded tokens per batch that fit in `fraction` of the memory left after `reserve_bytes`, in [lo, hi]."""
    usable = max(free_bytes - reserve_bytes, 0) * fraction
    return int(max(lo, min(hi, usable // max(per_token_bytes, 1.0))))


@torch.inference_mode()
def auto_batch_tokens(model: nn.Module, max_length: int, rows_per_block: int = 4096, chunk: int = 16384
                      ) -> tuple[int, int]:
    """(batch_tokens, max_batch) for `model`'s device: fixed on a CPU, sized to the free memory on a GPU.

    On a GPU a probe pass of min(max_length, 1024)-token sequences measures the peak memory per token of
    the forward (activations, attention workspace, the captured unembedding inputs); the budget is then 70%
    of the free memory, less what one block of the vocabulary pass holds (`rows_per_block` × `chunk`
    logits and their exponentials, float32), divided by that.
    """
    device = _model_device(model)
    if device.type != "cuda":
        return CPU_BATCH_TOKENS, CPU_MAX_BATCH
    with model_lock(model):
        vocab_size = model.get_output_embeddings().weight.shape[0]
    L = max(2, min(max_length, 1024))
    B = 4
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, min(vocab_size, 1000), (B, L), device=device)
    mask = torch.ones_like(ids)
    pos = torch.arange(L, device=device).expand(B, L)
    with capture_unembedding_input(model) as probe:
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        probe.captured = None
    torch.cuda.synchronize(device)
    per_token = (torch.cuda.max_memory_allocated(device) - base) / (B * L)
    free, _ = torch.cuda.mem_get_info(device)
    reserve = 4 * rows_per_block * min(chunk, vocab_size) * 4
    tokens = tokens_for_memory(free, per_token, reserve, lo=max_length)
    return tokens, GPU_MAX_BATCH


def batch_sizes(batch_tokens: int | str, model: nn.Module, max_length: int) -> tuple[int, int]:
    """(batch_tokens, max_batch) for `model`: "auto" sizes both to its device (`auto_batch_tokens`); a number
    is used as given, with the device's samples-per-batch cap."""
    if batch_tokens == "auto":
        return auto_batch_tokens(model, max_length)
    return int(batch_tokens), (GPU_MAX_BATCH if _model_device(model).type == "cuda" else CPU_MAX_BATCH)


def _model_device(model: nn.Module) -> torch.device:
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
                    starts: Sequence[int], head: Head, config: ForwardConfig, with_lse: bool, truncated: int
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
    lse = head.logsumexp(h, config.logits_chunk) if with_lse else torch.full_like(y, math.nan, dtype=h.dtype)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([p.numel() for p in positions]), 0)
    if config.on_device:
        return Features(h, y, lse, offsets, truncated)
    return Features(h.cpu(), y.cpu(), lse.cpu(), offsets, truncated)


@torch.inference_mode()
def forward_batch(model: nn.Module, head: Head, batch: Sequence[Encoded], config: ForwardConfig,
                  with_lse: bool = True) -> Features:
    """One padded forward pass over `batch`; returns the features of its scored positions, in batch order.

    Args:
        with_lse: compute the log-partition here; a caller that makes its own pass over the logits
            (the sketching of an index build) passes False and fills `lse` itself (left empty: NaN).
    """
    device = _model_device(model)
    seqs = [e.ids for e in batch]
    ids, mask, starts = pad_batch(seqs, config.padding_side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with capture_unembedding_input(model) as probe:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
    assert probe.captured is not None
    positions = [torch.arange(e.score_from, len(e.ids) - 1) for e in batch]
    return scored_features(probe.captured, seqs, positions, starts, head, config, with_lse,
                           sum(e.truncated for e in batch))


def iter_features(
    model: nn.Module, tokenizer, samples: Sequence[tuple[str, str]], config: ForwardConfig,
    head: Head | None = None, progress: bool = False, desc: str = "forward", with_lse: bool = True,
) -> Iterator[tuple[list[int], Features]]:
    """Yields (sample indices, their features) batch by batch, longest samples first.

    Args:
        tokenizer: the model's tokenizer, or for a vision-language model its `vision.VisionProcessor`
            (`LoadedModel.preprocessor` is the right one of the two).
        samples: (prompt, response) pairs; for a vision-language model also (prompt, response, image)
            triples (image: `vision.ImageRef`, a path, bytes or None).
        head: the unembedding in config.dtype on the model's device (built from the model if None).
        progress: show a tqdm bar on stderr with samples/s.

    Raises:
        ModelError: a sample has an image and the model is text-only.
    """
    if head is None:
        head = Head.from_model(model, config.dtype).to(_model_device(model))
    vlm = getattr(tokenizer, "is_vision_processor", False)
    if not vlm:
        refuse_images(samples)
        encoded = [encode(tokenizer, s[0], s[1], config) for s in samples]
        batches = plan_batches([len(e.ids) for e in encoded], config.batch_tokens, config.max_batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc=desc, unit="sample", dynamic_ncols=True, leave=False)
    try:
        if vlm:  # images: decoded and batched chunk by chunk (vision.py)
            from .vision import iter_features as iter_vision_features

            yield from iter_vision_features(model, tokenizer, samples, config, head, bar, with_lse)
            return
        for b in batches:
            feats = forward_batch(model, head, [encoded[i] for i in b], config, with_lse)
            if bar is not None:
                bar.update(len(b))
            yield b, feats
    finally:
        if bar is not None:
            bar.close()


def refuse_images(samples: Sequence[tuple], model_name: str = "") -> None:
    """Raises ModelError naming the first sample that has an image: a text-only model cannot take it."""
    for i, s in enumerate(samples):
        if len(s) > 2 and s[2] is not None:
            where = getattr(s[2], "source", "") or ""
            row = getattr(s[2], "row", None)
            if where:
                where = f"{where}, row {row}" if row is not None else where
            else:
                where = f"sample {i}"
            named = f" {model_name!r}" if model_name else ""
            raise ModelError(f"{where} has an image but the model{named} is text-only; pass a vision-language "
                             "model (--model, e.g. a Qwen2-VL or LLaVA directory) or leave the images out")


def extract_features(
    model: nn.Module, tokenizer, samples: Sequence[tuple[str, str]], config: ForwardConfig,
    head: Head | None = None, progress: bool = False, desc: str = "forward",
) -> Features:
    """All features of `samples`, in input order (see iter_features)."""
    order: list[int] = []
    parts: list[Features] = []
    for idx, feats in iter_features(model, tokenizer, samples, config, head, progress, desc):
        order.extend(idx)
        parts.append(feats)
    if not parts:
        raise ValueError("extract_features needs at least one sample")
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Features.concat(parts).select(inverse)
