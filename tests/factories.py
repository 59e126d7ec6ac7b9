"""Seeded factories for tests: a tiny Llama (|V| = 128, d = 32) and a character tokenizer, no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 128
HIDDEN = 32
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII: ids 0-3 special, then one id per character (then the
    characters of `extra`, e.g. a newline)."""
    chars = [chr(c) for c in range(32, 127)] + list(extra)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return fast


def make_model(seed: int = 0, vocab_size: int = VOCAB_SIZE, hidden: int = HIDDEN, layers: int = 2,
               tie: bool = False) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama; the init std is raised so probabilities are not uniform."""
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


# a chatml-like template over the tokenizer's own special tokens: "<s>role: content</s> " per turn (the
# tokenizer has no newline)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s> {% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def make_chat_tokenizer() -> PreTrainedTokenizerFast:
    """`make_tokenizer` with a chat template (CHAT_TEMPLATE), as a fine-tuned chat model's tokenizer has."""
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok
