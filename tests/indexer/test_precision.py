"""The device and precision path of index builds: half-precision forward passes, real architectures without
weights, memory-sized batches, the background shard writer and (with a GPU) the CUDA build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer.archs import ARCHS, PUBLISHED_PARAMETERS, random_model
from forvalue.indexer.build import build_index
from forvalue.indexer.config import DTYPE_CHOICES, BuildConfig, SketchConfig
from forvalue.indexer.errors import ConfigError, ModelError
from forvalue.indexer.features import Features, Head
from forvalue.indexer.forward import CPU_BATCH_TOKENS, auto_batch_tokens, tokens_for_memory
from forvalue.indexer.model import DTYPES, load_model, resolve_dtype
from forvalue.indexer.score import self_scores
from forvalue.indexer.sketch import Sketcher, reference_sketch
from forvalue.indexer.store import Build, IndexRoot

from serving import corpus

CONFIG = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=24), shard_size=8)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_have_the_published_parameter_counts(arch):
    model = random_model(arch, torch.device("meta"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[arch]
    assert model.config._attn_implementation == "sdpa"


def test_unknown_architecture_is_refused_with_the_choices():
    with pytest.raises(ModelError, match="qwen2.5-0.5b"):
        load_model("random:gpt-17")


def test_dtype_names():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(None, cpu) is None
    with pytest.raises(ConfigError, match="int8"):
        resolve_dtype("int8", cpu)


def test_every_dtype_choice_resolves():
    """config.DTYPE_CHOICES (what --dtype offers, torch-free) are the names model.DTYPES maps, plus auto."""
    assert DTYPE_CHOICES == ("auto", *DTYPES)
    for name in DTYPE_CHOICES:
        assert resolve_dtype(name, torch.device("cpu")) in DTYPES.values()


def test_memory_budget_arithmetic():
    gib = 1 << 30
    # 70% of (10 GiB - 2 GiB) at 1 MiB per token
    assert tokens_for_memory(10 * gib, 1 << 20, 2 * gib) == int(0.7 * 8 * 1024)
    assert tokens_for_memory(gib, 1 << 20, 2 * gib, lo=300) == 300          # nothing free: the floor
    assert tokens_for_memory(1000 * gib, 1, 0, hi=5000) == 5000             # the ceiling


def test_batches_on_a_cpu_are_fixed(model32):
    assert auto_batch_tokens(model32, 2048) == (CPU_BATCH_TOKENS, 64)


def _shards(root: str, version_name: str):
    """(the version, its stored arrays concatenated over shards, with the global token offsets)."""
    version = IndexRoot(root).load(version_name, verify=False)
    out = {name: np.concatenate(version.shard_arrays(name)) for name in ("sketch", "g_norm", "h", "y", "lse")}
    out["offsets"] = version.offsets()
    return version, out


def _features(arrs) -> Features:
    return Features(torch.from_numpy(arrs["h"].astype(np.float64)), torch.from_numpy(arrs["y"]).long(),
                    torch.from_numpy(arrs["lse"].astype(np.float64)), torch.from_numpy(arrs["offsets"]))


def test_half_precision_build_is_a_build_of_its_own_and_close_to_float32(tmp_path, served_model_dir):
    samples = corpus(20)
    lm32 = load_model(served_model_dir)
    lm16 = load_model(served_model_dir, dtype="bfloat16")
    assert lm16.dtype == torch.bfloat16
    v32 = build_index(str(tmp_path / "a"), samples, lm32, CONFIG)
    v16 = build_index(str(tmp_path / "b"), samples, lm16, CONFIG)
    b32, a32 = _shards(str(tmp_path / "a"), v32)
    b16, a16 = _shards(str(tmp_path / "b"), v16)
    assert b16.manifest["forward_dtype"] == "bfloat16" and "forward_dtype" not in b32.manifest
    assert b16.manifest["forward"]["dtype"] == "bfloat16"
    s32, s16 = a32["sketch"], a16["sketch"]
    cos = (s32 * s16).sum(1) / np.linalg.norm(s32, axis=1) / np.linalg.norm(s16, axis=1)
    assert cos.min() > 0.98
    assert not np.array_equal(s32, s16)  # the comparison is not of one computation with itself
    g32, g16 = a32["g_norm"], a16["g_norm"]
    np.testing.assert_allclose(g16, g32, rtol=0.05)


def test_stored_norms_and_sketches_equal_the_references(tmp_path, served_model_dir):
    """What the fused device path stores (‖G‖, sketch) = two-pass references on the stored features."""
    lm = load_model(served_model_dir, dtype="bfloat16")
    name = build_index(str(tmp_path), corpus(20), lm, CONFIG)
    version, arrs = _shards(str(tmp_path), name)
    head = Head.from_model(lm.model, torch.float64)
    sk = Sketcher(torch.from_numpy(np.array(version.global_array("projection.npy"))).double(),
                  torch.from_numpy(np.array(version.global_array("vocab_bucket.npy"))).long(),
                  torch.from_numpy(np.array(version.global_array("vocab_sign.npy"))).double(), 32)
    f = _features(arrs)
    want = self_scores(f, head).clamp(min=0).sqrt().numpy()
    assert want.min() > 1e-2
    np.testing.assert_allclose(arrs["g_norm"], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(arrs["sketch"], reference_sketch(f, head, sk).numpy(), rtol=1e-4, atol=1e-5)


def test_a_failed_background_write_fails_the_build_and_a_rerun_finishes_it(tmp_path, served_lm, monkeypatch):
    samples = corpus(24)
    clean = build_index(str(tmp_path / "clean"), samples, served_lm, CONFIG)
    real = Build.write_shard

    def failing(self, i, *args, **kwargs):
        if i == 1:
            raise OSError(28, "No space left on device")
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(Build, "write_shard", failing)
    root = str(tmp_path / "idx")
    with pytest.raises(OSError, match="No space left"):
        build_index(root, samples, served_lm, CONFIG)
    assert IndexRoot(root).versions() == []  # nothing published
    monkeypatch.setattr(Build, "write_shard", real)
    name = build_index(root, samples, served_lm, CONFIG)
    _, got = _shards(root, name)
    _, want = _shards(str(tmp_path / "clean"), clean)
    for key in ("sketch", "g_norm", "h", "offsets"):
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.gpu
def test_cuda_build_equals_cpu_build(tmp_path, served_model_dir):
    samples = corpus(20)
    cpu = load_model(served_model_dir)
    gpu = load_model(served_model_dir, device="cuda", dtype="float32")
    a = build_index(str(tmp_path / "cpu"), samples, cpu, CONFIG)
    b = build_index(str(tmp_path / "gpu"), samples, gpu, CONFIG)
    _, x = _shards(str(tmp_path / "cpu"), a)
    _, y = _shards(str(tmp_path / "gpu"), b)
    for key in ("sketch", "g_norm", "h", "lse"):
        np.testing.assert_allclose(y[key], x[key], rtol=1e-3, atol=1e-4)
    tokens, max_batch = auto_batch_tokens(gpu.model, 512)
    assert tokens >= 512 and max_batch > 64


def test_tf32_logits_only_for_the_weights_of_a_half_precision_model(served_model_dir):
    half = load_model(served_model_dir, dtype="bfloat16")
    full = load_model(served_model_dir)
    assert Head.from_model(half.model).tf32
    assert not Head.from_model(full.model).tf32
    assert not Head.from_model(half.model, torch.float64).tf32
    # the premise: a bfloat16 value keeps at most 10 mantissa bits in float32 (TF32 inputs are then exact)
    w = Head.from_model(half.model).weight
    bits = w.view(torch.int32) & 0x1FFF  # the 13 low mantissa bits TF32 drops
    assert int(bits.count_nonzero()) == 0
