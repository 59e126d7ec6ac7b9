"""Randomly initialised models of real architectures, for throughput measurements without weights.

A forward pass costs the same whatever the weights hold, so `--model random:qwen2.5-0.5b` times an index
build, a query or a benchmark on the shape of Qwen2.5-0.5B without downloading it. The configurations
below are those the models were published with (layer count, widths, heads, vocabulary, RoPE); the test
checks each one's parameter count against the published model's. Samples are tokenised with the default
model's tokenizer (its ids are valid in every vocabulary here), so answers mean nothing: these models are
for timing and memory only.
"""

from __future__ import annotations

import torch

from .errors import ModelError

RANDOM_PREFIX = "random:"

_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
          "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
          "bos_token_id": 151643, "eos_token_id": 151643}
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

ARCHS: dict[str, dict] = {
    "smollm2-135m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
    "llama-3.2-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}

# parameter counts of the published checkpoints (tied input/output embeddings counted once)
PUBLISHED_PARAMETERS = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "llama-3.2-1b": 1_235_814_400,
}


def arch_config(arch: str, **overrides):
    """The transformers config of architecture `arch` (a key of ARCHS), with `overrides` applied.

    Raises:
        ModelError: unknown architecture.
    """
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r} for a random model; choose one of {', '.join(sorted(ARCHS))}")
    spec = {**ARCHS[arch], **overrides}
    return AutoConfig.for_model(**spec)


def random_model(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A randomly initialised causal LM of architecture `arch`, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    config = arch_config(arch, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
