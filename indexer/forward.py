"""The text pass: (prompt, response) samples → per-token features (features.py: h_k, y_k, lse_k at every
scored position k), batched by a token budget over length-sorted samples, and the batch sizes a device affords.

The input of lm_head is captured by swapping the output-embedding module for a pass-through for the
duration of the pass, so it is exactly what the head sees, whatever the architecture does before it.
Positions are given explicitly (cumsum of the attention mask), so results do not depend on the padding
side or on which samples share a batch. `iter_features` runs the pass the model's preprocessor chooses: a
vision-language model's `VisionProcessor` brings its own (vision.py); a tokenizer gets the text pass here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .chat import chat_tokens
from .config import CPU_MAX_BATCH
from .errors import ModelError
from .formats import Chat
from .features import (
    Features, ForwardConfig, Head, capture_unembedding_input, model_device, model_lock, pad_batch, plan_batches,
    scored_features,
)

# Batch budget on a CPU: larger batches only add padding and cache misses there.
CPU_BATCH_TOKENS = 4096
# Samples per batch on a GPU (short samples then fill a batch by count, not tokens).
GPU_MAX_BATCH = 1024


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample: ids = prompt ids + response ids (+ EOS); positions ≥ score_from are scored, or
    exactly `positions` when given (a conversation's assistant turns). Position p predicts ids[p + 1]."""

    ids: list[int]
    score_from: int
    truncated: bool = False
    positions: tuple[int, ...] | None = None

    def scored(self) -> torch.Tensor:
        if self.positions is None:
            return torch.arange(self.score_from, len(self.ids) - 1)
        return torch.tensor(self.positions, dtype=torch.long)


def encode_input(tokenizer, sample: tuple, config: ForwardConfig) -> Encoded:
    """`encode` of a (prompt, response) pair, or `encode_chat` of a (prompt, response, formats.Chat) sample."""
    if len(sample) > 2 and isinstance(sample[2], Chat):
        return encode_chat(tokenizer, sample[2], config)
    return encode(tokenizer, sample[0], sample[1], config)


def encode_chat(tokenizer, chat: Chat, config: ForwardConfig) -> Encoded:
    """A conversation tokenised by the model's chat template (chat.py); the assistant turns are scored (every
    position with tokens="all"). Longer than max_length: cut from the right, as SFT truncates."""
    ids, targets = chat_tokens(tokenizer, chat)
    truncated = len(ids) > config.max_length
    ids = ids[: config.max_length]
    if config.tokens == "all":
        positions = tuple(range(len(ids) - 1))
    else:
        positions = tuple(t - 1 for t in targets if 0 < t < len(ids))
    if not positions:
        raise ValueError(f"no assistant token is left within max_length {config.max_length}; raise --max-length")
    return Encoded(ids, positions[0], truncated, positions)


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
    device = model_device(model)
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
    return int(batch_tokens), (GPU_MAX_BATCH if model_device(model).type == "cuda" else CPU_MAX_BATCH)


@torch.inference_mode()
def forward_batch(model: nn.Module, head: Head, batch: Sequence[Encoded], config: ForwardConfig,
                  with_lse: bool = True) -> Features:
    """One padded forward pass over `batch`; returns the features of its scored positions, in batch order.

    Args:
        with_lse: compute the log-partition here; a caller that makes its own pass over the logits
            (the sketching of an index build) passes False and fills `lse` itself (left empty: NaN).
    """
    device = model_device(model)
    seqs = [e.ids for e in batch]
    ids, mask, starts = pad_batch(seqs, config.padding_side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with capture_unembedding_input(model) as probe:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False)
    assert probe.captured is not None
    positions = [e.scored() for e in batch]
    return scored_features(probe.captured, seqs, positions, starts, head, config, with_lse,
                           [e.truncated for e in batch])


def iter_features(
    model: nn.Module, tokenizer, samples: Sequence[tuple[str, str]], config: ForwardConfig,
    head: Head | None = None, progress: bool = False, desc: str = "forward", with_lse: bool = True,
) -> Iterator[tuple[list[int], Features]]:
    """Yields (sample indices, their features) batch by batch, longest samples first.

    Args:
        tokenizer: the model's tokenizer, or a preprocessor with its own pass (`iter_features(model, samples,
            config, head, bar, with_lse)`: a vision-language model's `vision.VisionProcessor`);
            `LoadedModel.preprocessor` is the right one of the two.
        samples: (prompt, response) pairs; for a vision-language model also (prompt, response, image)
            triples (image: `images.ImageRef`, a path, bytes or None).
        head: the unembedding in config.dtype on the model's device (built from the model if None).
        progress: show a tqdm bar on stderr with samples/s.

    Raises:
        ModelError: a sample has an image and the model is text-only.
    """
    if head is None:
        head = Head.from_model(model, config.dtype).to(model_device(model))
    own_pass = getattr(tokenizer, "iter_features", None)  # a VisionProcessor runs the vision pass (vision.py)
    if own_pass is None:
        refuse_images(samples)
        encoded = [encode_input(tokenizer, s, config) for s in samples]
        batches = plan_batches([len(e.ids) for e in encoded], config.batch_tokens, config.max_batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc=desc, unit="sample", dynamic_ncols=True, leave=False)
    try:
        if own_pass is not None:  # images: decoded and batched chunk by chunk
            yield from own_pass(model, samples, config, head, bar, with_lse)
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
        if len(s) > 2 and s[2] is not None and not isinstance(s[2], Chat):
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
    """All features of `samples`, in input order (see iter_features); their distributions (`Features.probs`)
    only when all of them fit in `config.probs_bytes`."""
    order: list[int] = []
    parts: list[Features] = []
    kept, keep = 0, True  # bytes of distributions held; once a batch has none or they pass the budget, none
    for idx, feats in iter_features(model, tokenizer, samples, config, head, progress, desc):
        if keep and feats.probs is not None:
            kept += feats.probs.numel() * feats.probs.element_size()
        if keep and (feats.probs is None or kept > config.probs_bytes):
            keep = False
            parts = [dataclasses.replace(p, probs=None) for p in parts]
        if not keep and feats.probs is not None:
            feats = dataclasses.replace(feats, probs=None)
        order.extend(idx)
        parts.append(feats)
    if not parts:
        raise ValueError("extract_features needs at least one sample")
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Features.concat(parts).select(inverse)
