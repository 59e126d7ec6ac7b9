"""Tiny randomly initialised vision-language models for tests, built from configs (no downloads).

Two families: Qwen2-VL (and Qwen2.5-VL) and LLaVA (CLIP tower + Llama). Each comes with a character-level
tokenizer holding the family's special tokens, a chat template and a PIL image processor with tiny sizes, as
a `VisionProcessor`. Hidden size 32, |V| = 128, 1-2 layers, images of 28-56 px: a pass takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from forvalue.indexer.vision import LLAVA, QWEN2_VL, VisionProcessor

VOCAB_SIZE = 128
HIDDEN = 32
BASE = ["<pad>", "<s>", "</s>", "<unk>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<image>"]

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_vlm_tokenizer(specials: list[str], eos: str) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII and newline, plus `specials` as atomic special tokens."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(BASE + chars + specials)}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=eos,
                                   unk_token="<unk>")


def _text_config(eos_id: int, layers: int) -> dict:
    return dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                pad_token_id=0, bos_token_id=1, eos_token_id=eos_id)


def make_qwen2_vl(seed: int = 0, layers: int = 2, v25: bool = False, max_pixels: int = 56 * 56):
    """(model, processor): a tiny Qwen2-VL (or Qwen2.5-VL with v25) and its `VisionProcessor`.

    Images are resized to between 28×28 and `max_pixels` pixels: 1 to 4 image tokens (patch 14, merge 2).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_vlm_tokenizer(QWEN_SPECIALS, eos="<|im_end|>")
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS)))
    text = _text_config(ids["<|im_end|>"], layers)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    marks = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                 vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if v25:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=2, out_hidden_size=HIDDEN,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                      fullatt_block_indexes=[1], initializer_range=0.2)
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
    cfg = Config(text_config=text, vision_config=vision, **marks)
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
                                  merge_size=2)
    return model, VisionProcessor(QWEN2_VL, tok, ip, QWEN_TEMPLATE, model.config)


def make_llava(seed: int = 0, layers: int = 2, image_size: int = 28, strategy: str = "default"):
    """(model, processor): a tiny LLaVA (1-layer CLIP tower, patch 7, Llama text model) and its processor.

    Images are resized and cropped to `image_size`² pixels: (image_size / 7)² image tokens (+1 with
    strategy "full").
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_vlm_tokenizer(LLAVA_SPECIALS, eos="</s>")
    image_id = tok.convert_tokens_to_ids("<image>")
    text = _text_config(2, layers) | {"model_type": "llama"}
    vision = dict(model_type="clip_vision_model", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                  num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=7,
                  projection_dim=HIDDEN, initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                      vision_feature_select_strategy=strategy, vision_feature_layer=-1, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return model, VisionProcessor(LLAVA, tok, ip, LLAVA_TEMPLATE, model.config, {"num_additional_image_tokens": 1})


def make_image(seed: int = 0, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    """An encoded random RGB image of `size` = (height, width)."""
    import io

    from PIL import Image

    arr = (np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def save_vlm(model, processor: VisionProcessor, out_dir) -> str:
    """The model and processor saved as a Hugging Face directory (what `--model` / load_model take)."""
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)
