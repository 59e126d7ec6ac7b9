"""Vision-language models: images in, the same per-token features out.

For a VLM the For-Value score runs over the text tokens that follow an image-conditioned prompt. A sample
(prompt, response, image) is rendered with the model's chat template (one user turn holding the image and
the prompt text, then the assistant turn), the image's placeholder token is expanded to as many tokens as
the vision tower gives the image, and one forward pass records, at each scored position k, the lm_head
input h_k, the target y_k and lse_k, exactly as `forward.py` does for a text model. Scored positions: the
response tokens and the EOS after them (`tokens="response"`, the positions after the assistant turn
begins), or every text position (`tokens="all"`): a position whose input or target is an image
placeholder or a vision marker token is never scored.

Supported families, chosen from the model's `config.json` (`model_type`):

- `qwen2_vl`, `qwen2_5_vl` (Qwen2-VL, Qwen2.5-VL): `<|image_pad|>` × (grid t·h·w / merge²), multimodal
  rotary positions computed by the model from the attention mask.
- `llava` (LLaVA-1.5 and others with a CLIP or SigLIP tower): `<image>` × (H/p)·(W/p) (+ the class token
  with `vision_feature_select_strategy="full"`).

`VisionProcessor` is forvalue's own composition of the checkpoint's tokenizer, its image processor (the
PIL implementation: no torchvision needed) and chat template; transformers' processor classes are not
used because some cannot be built without torchvision. It gives the same input ids and pixels
(tests/indexer/test_vision.py compares them where transformers' processor can be built).

Images are read and validated by images.py (local files or bytes only, never downloaded).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError, ModelError
from .features import Features, ForwardConfig, Head, capture_unembedding_input, pad_batch, plan_batches, scored_features
from .formats import Chat
from .images import ImageRef

# samples whose images are decoded and preprocessed at once: bounds the pixel tensors held in memory
ENCODE_CHUNK = 64


# ------------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Family:
    """How one family of VLMs takes images.

    Attributes:
        name: the family's name (recorded in index manifests).
        model_types: `config.model_type` values of the family.
        image_token: the placeholder its chat templates put where the image goes.
        marker_ids: config attributes holding the ids of the image placeholder and vision marker tokens
            (never scored).
        mrope: the model computes multimodal rotary positions itself from the attention mask (Qwen2-VL);
            otherwise positions are passed explicitly (cumsum of the attention mask).
    """

    name: str
    model_types: tuple[str, ...]
    image_token: str
    marker_ids: tuple[str, ...]
    mrope: bool


QWEN2_VL = Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "<|image_pad|>",
                  ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), mrope=True)
LLAVA = Family("llava", ("llava",), "<image>", ("image_token_id",), mrope=False)
FAMILIES = (QWEN2_VL, LLAVA)
SUPPORTED_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(config: dict) -> Family | None:
    """The VLM family of a model from its config.json content; None for a text-only model.

    Raises:
        ModelError: a vision-language model (it has a vision_config) of an unsupported type.
    """
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    if "vision_config" in config or any("ConditionalGeneration" in a or "ImageTextToText" in a
                                        for a in config.get("architectures") or []):
        raise ModelError(f"vision-language model type {model_type!r} is not supported; supported types: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return None


def read_config(model_dir: str | os.PathLike[str]) -> dict:
    """The content of `model_dir/config.json` ({} when absent or unreadable: the loader reports that)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ processor


@dataclass(frozen=True)
class VisionEncoded:
    """One sample as model inputs.

    Attributes:
        ids: token ids: the chat-rendered prompt with the image placeholder expanded, then response (+ EOS).
        positions: the scored positions, ascending; position p predicts ids[p + 1].
        pixels: the image processor's outputs for the sample's image (pixel_values, image_grid_thw, ...),
            each with the image along dim 0; empty without an image.
        truncated: the response was cut to fit max_length.
    """

    ids: list[int]
    positions: list[int]
    pixels: dict[str, torch.Tensor]
    truncated: bool = False


class VisionProcessor:
    """Tokenizer + image processor + chat template of a VLM: samples → `VisionEncoded`.

    Args:
        family: the model family.
        tokenizer: the checkpoint's tokenizer.
        image_processor: its image processor (a PIL-backend one: no torchvision needed).
        chat_template: a Jinja chat template taking messages whose content is a list of
            {"type": "image"} and {"type": "text", "text": ...} items.
        model_config: the model's config (`PretrainedConfig`): token ids of the placeholders, patch size.
        extra: processor settings that are not in the model config (LLaVA's num_additional_image_tokens).
    """

    def __init__(self, family: Family, tokenizer, image_processor, chat_template: str, model_config,
                 extra: dict | None = None):
        if not chat_template:
            raise ModelError("the vision-language model has no chat template (chat_template.jinja or the "
                             "tokenizer's chat_template); it places the image in the prompt")
        self.family = family
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.model_config = model_config
        self.extra = dict(extra or {})
        self.image_token_id = int(_config_value(model_config, "image_token_id"))
        self.marker_ids = frozenset(
            int(v) for v in (_config_value(model_config, a, None) for a in family.marker_ids) if v is not None)

    # pass-throughs, so that a processor can stand where the tokenizer stood
    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def render(self, prompt: str, image: bool) -> str:
        """The chat-rendered prompt: one user turn (the image first, then the text) and the assistant's start."""
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=self.chat_template)

    def image_inputs(self, img) -> dict[str, torch.Tensor]:
        """The image processor's outputs for one image (image along dim 0)."""
        out = self.image_processor(images=[img], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def n_image_tokens(self, pixels: dict[str, torch.Tensor]) -> int:
        """How many placeholder tokens the model fills with the image's features."""
        if self.family is QWEN2_VL:
            merge = int(getattr(self.image_processor, "merge_size", None)
                        or self.model_config.vision_config.spatial_merge_size)
            return int(pixels["image_grid_thw"][0].prod()) // merge**2
        # LLaVA: one token per patch, the class token dropped by the "default" feature selection
        patch = int(self.model_config.vision_config.patch_size)
        h, w = pixels["pixel_values"].shape[-2:]
        extra = self.extra.get("num_additional_image_tokens")
        if extra is None:
            extra = 1 if getattr(self.model_config.vision_config, "model_type", "") == "clip_vision_model" else 0
        n = (h // patch) * (w // patch) + int(extra)
        if getattr(self.model_config, "vision_feature_select_strategy", "default") == "default":
            n -= 1
        return n

    def encode(self, prompt: str, response: str, image: ImageRef | None, config: ForwardConfig,
               where: str = "") -> VisionEncoded:
        """Tokenise one sample, load and preprocess its image, and pick the scored positions.

        The prompt and the response are tokenised separately (a clean boundary, as for text models). A
        sample longer than max_length loses response tokens from the right; one whose prompt and image
        alone do not fit is refused.

        Raises:
            DataError: the image is invalid or the prompt/response holds a placeholder token; the sample
                does not fit max_length. ModelError: the chat template placed no image placeholder.
        """
        tok = self.tokenizer
        text = self.render(prompt, image is not None)
        bos = tok.bos_token
        p_ids = list(tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])
        r_ids = list(tok(response, add_special_tokens=False)["input_ids"])
        if config.add_eos and tok.eos_token_id is not None:
            r_ids.append(tok.eos_token_id)
        fail = image.error if image is not None else (lambda m: DataError(f"{where}: {m}" if where else m))
        if any(t in self.marker_ids for t in r_ids):
            raise fail("the response holds an image placeholder or vision marker token; remove it from the text")
        slots = [i for i, t in enumerate(p_ids) if t == self.image_token_id]
        if len(slots) != (image is not None):
            if image is not None and not slots:
                raise ModelError("the chat template placed no image placeholder "
                                 f"({self.family.image_token}) for an image; use the model's own chat template")
            raise fail("the prompt holds an image placeholder token; remove it from the prompt text "
                       "(the chat template places the image)")
        pixels: dict[str, torch.Tensor] = {}
        if image is not None:
            img = image.load()
            try:
                pixels = self.image_inputs(img)
            except (ValueError, RuntimeError) as exc:
                raise image.error(f"the image processor refused it ({exc})") from exc
            n = self.n_image_tokens(pixels)
            s = slots[0]
            p_ids = p_ids[:s] + [self.image_token_id] * n + p_ids[s + 1 :]
        truncated = False
        over = len(p_ids) + len(r_ids) - config.max_length
        if over > 0:
            if over >= len(r_ids):
                raise fail(f"the prompt with its image takes {len(p_ids)} tokens, too many for max_length "
                           f"{config.max_length}; raise max_length or use a smaller image")
            r_ids = r_ids[: len(r_ids) - over]
            truncated = True
        ids = p_ids + r_ids
        if config.tokens == "all":
            mark = self.marker_ids
            positions = [p for p in range(len(ids) - 1) if ids[p] not in mark and ids[p + 1] not in mark]
        else:
            positions = list(range(len(p_ids) - 1, len(ids) - 1))
        return VisionEncoded(ids, positions, pixels, truncated)

    def fingerprint(self, tokenizer_fingerprint: str) -> str:
        """sha256 hex over the tokenizer's fingerprint, the image processor's settings, the chat template and
        the family: what decides the input ids and pixels of a sample."""
        settings = {k: v for k, v in self.image_processor.to_dict().items() if not k.startswith("_")}
        payload = {"tokenizer": tokenizer_fingerprint, "family": self.family.name, "image_processor": settings,
                   "chat_template": self.chat_template, "extra": self.extra}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(b"forvalue-vision-processor-v1\0" + blob).hexdigest()

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> None:
        """Write tokenizer (with the chat template), image processor and `extra` into `out_dir`, so that
        `load_model(out_dir)` reads them back (beside the model's own save_pretrained)."""
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        if self.extra:
            (Path(out_dir) / "processor_config.json").write_text(json.dumps(self.extra, indent=2) + "\n")

    def iter_features(self, model: nn.Module, samples: Sequence[tuple], config: ForwardConfig, head: Head,
                      bar=None, with_lse: bool = True) -> Iterator[tuple[list[int], Features]]:
        """The vision pass over `samples` (module-level `iter_features`): how `forward.iter_features` runs a
        vision-language model's samples when this processor is the model's preprocessor."""
        return iter_features(model, self, samples, config, head, bar, with_lse)


def _config_value(config, name: str, *default):
    for attr in (name, name.replace("_id", "_index")):  # LLaVA checkpoints name it image_token_index
        value = getattr(config, attr, None)
        if value is not None:
            return value
    if default:
        return default[0]
    raise ModelError(f"the model config has no {name}; it is not a {type(config).__name__} this version reads")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _chat_template(model_dir: Path, tokenizer) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        try:
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    value = getattr(tokenizer, "chat_template", None)
    return value if isinstance(value, str) and value else None


def load_vlm(model_dir: Path, family: Family, shown: str) -> tuple[nn.Module, VisionProcessor]:
    """Model and processor of a VLM from a local Hugging Face directory (never downloads).

    The model is loaded with transformers' image-text-to-text auto class in its stored dtype; the image
    processor with the PIL backend.

    Raises:
        ModelError: a part is missing or fails to load.
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        raise ModelError(f"cannot load a vision-language model from {shown!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {shown!r}: {exc}") from exc
    # the PIL implementation: torchvision's is faster but not installed beside forvalue's torch
    backend = {"backend": "pil"} if _transformers_major() >= 5 else {"use_fast": False}
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, **backend)
    except Exception as exc:
        raise ModelError(f"cannot load the image processor of {shown!r} (preprocessor_config.json): {exc}") from exc
    extra = {}
    try:
        stored = json.loads((model_dir / "processor_config.json").read_text(encoding="utf-8"))
        extra = {k: stored[k] for k in ("num_additional_image_tokens",) if k in stored}
    except (OSError, ValueError):
        pass
    processor = VisionProcessor(family, tokenizer, image_processor, _chat_template(model_dir, tokenizer),
                                model.config, extra)
    return model, processor


# ------------------------------------------------------------------------------------------------ forward


def _image_of(sample: tuple) -> ImageRef | None:
    image = sample[2] if len(sample) > 2 else None
    if image is None or isinstance(image, ImageRef):
        return image
    if isinstance(image, (bytes, bytearray)):
        return ImageRef(data=bytes(image))
    return ImageRef(path=os.fspath(image))


@torch.inference_mode()
def forward_batch(model: nn.Module, head: Head, processor: VisionProcessor, batch: Sequence[VisionEncoded],
                  config: ForwardConfig, with_lse: bool = True) -> Features:
    """One padded forward pass over `batch` → the features of its scored positions, in batch order."""
    device = next(model.parameters()).device
    seqs = [e.ids for e in batch]
    ids, mask, starts = pad_batch(seqs, config.padding_side)
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    with_images = [e for e in batch if e.pixels]
    for key in (with_images[0].pixels if with_images else {}):
        value = torch.cat([e.pixels[key] for e in with_images])
        inputs[key] = value.to(device, dtype=model.dtype) if value.is_floating_point() else value.to(device)
    if "mm_token_type_ids" in _forward_params(type(model)):
        inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long().to(device)
    if processor.family.mrope and with_images:
        # the model derives the 3-D positions of image and text tokens from the mask; its cache of
        # position offsets is generation state, reset so that no earlier call leaks into this one
        for module in (model, getattr(model, "model", None)):
            if module is not None and getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = None
    else:
        inputs["position_ids"] = ((mask.cumsum(-1) - 1).clamp(min=0)).to(device)
    with capture_unembedding_input(model) as probe:
        try:
            model(**inputs)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"the vision-language model refused a batch ({exc}); check the image processor "
                             "settings match the model") from exc
    assert probe.captured is not None
    positions = [torch.tensor(e.positions, dtype=torch.long) for e in batch]
    return scored_features(probe.captured, seqs, positions, starts, head, config, with_lse,
                           [e.truncated for e in batch])


@functools.lru_cache(maxsize=32)
def _forward_params(cls: type) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def iter_features(model: nn.Module, processor: VisionProcessor, samples: Sequence[tuple], config: ForwardConfig,
                  head: Head, bar=None, with_lse: bool = True) -> Iterator[tuple[list[int], Features]]:
    """Yields (sample indices, their features) batch by batch (see `forward.iter_features`).

    Images are decoded and preprocessed ENCODE_CHUNK samples at a time, so memory does not grow with the
    corpus; within a chunk, batches are length-sorted and filled to config.batch_tokens.

    Args:
        samples: (prompt, response) or (prompt, response, image) tuples; image: an `ImageRef`, a path, bytes
            or None.
    """
    if any(len(s) > 2 and isinstance(s[2], Chat) for s in samples):
        raise ModelError("conversations (the messages format, or --template chat) are not read for vision-language "
                         "models yet; give the rows as prompt + response with an image column")
    for a in range(0, len(samples), ENCODE_CHUNK):
        chunk = range(a, min(a + ENCODE_CHUNK, len(samples)))
        encoded = [processor.encode(samples[i][0], samples[i][1], _image_of(samples[i]), config,
                                    where=f"sample {i}") for i in chunk]
        for b in plan_batches([len(e.ids) for e in encoded], config.batch_tokens, config.max_batch):
            feats = forward_batch(model, head, processor, [encoded[i] for i in b], config, with_lse)
            if bar is not None:
                bar.update(len(b))
            yield [a + i for i in b], feats
