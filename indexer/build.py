"""Offline index builds: corpus → fitted sketch maps → shards (sketch + re-rank data + metadata) → FAISS.

A build is resumable: its directory is keyed by everything that determines its content (model and
tokenizer fingerprints, token scope, sketch parameters, the corpus itself), every shard is written
atomically (store.py), and a rerun skips finished shards. The sketch maps are fitted first, from a seeded
sample of the corpus, and stored before any shard is written, so every shard of a build uses the same
maps, and `add` reuses them for new samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import CALIBRATION_ROWS, BuildConfig, FirstStageConfig, SketchConfig
from .data import Sample, content_key, stored_row
from .deletion import DELETED_FILE, current_takedowns, deleted_json, hidden_rows, takedown_lock
from .errors import DataError, IndexMismatchError
from .features import Features, ForwardConfig, Head, token_rows
from .filters import FieldIndex
from .forward import iter_features, refuse_images
from .model import LoadedModel
from .score import unit_scale
from .sketch import MAP_FILES, Sketcher, fit_sketcher, sketch_from_residuals, vocab_pass
from .store import Build, IndexRoot, Version

log = logging.getLogger("forvalue.indexer.build")

RERANK_NUMPY = {"float32": np.float32, "float16": np.float16}  # the tiers of config.RERANK_STORES that store h


def corpus_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over ids, prompts and responses (and the content of a sample's image, when it has one), in order."""
    h = hashlib.sha256()
    for s in samples:
        parts = (s.id, s.prompt, s.response)
        if s.chat is not None:
            parts += ("\0chat", json.dumps(s.chat.to_json(), sort_keys=True))
        if s.image is not None:
            from .images import file_sha256

            parts += ("\0image", file_sha256(s.image))
        for part in parts:
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def _sketch_params(cfg: SketchConfig) -> dict:
    return dataclasses.asdict(cfg) | {"dim": cfg.dim, "n_dedicated": cfg.n_dedicated}


def _params(lm: LoadedModel, config: BuildConfig) -> dict:
    vocab_size, hidden_size = lm.model.get_output_embeddings().weight.shape
    model = {"name": lm.name, "fingerprint": lm.fingerprint, "tokenizer_fingerprint": lm.tokenizer_fingerprint,
             "vocab_size": int(vocab_size), "hidden_size": int(hidden_size)}
    if lm.processor is not None:  # a vision-language model: its family (vision.py)
        model["vision"] = lm.processor.family.name
    params = {
        "model": model,
        "tokens": config.tokens, "max_length": config.max_length, "add_eos": True,
        "sketch": _sketch_params(config.sketch), "rerank_dtype": config.rerank_dtype,
        # the recompute tier stores no top probabilities (bounds need the candidates' hidden states)
        "rerank_top": config.rerank_top if config.stores_states else 0, "normalize": config.normalize,
        "data": config.schema.to_json(),
    }
    if lm.dtype != torch.float32:  # a half-precision pass gives slightly other features: a build of its own
        params["forward_dtype"] = lm.dtype_name
    return params


def fit_maps(lm: LoadedModel, head: Head, samples: Sequence[Sample], config: BuildConfig, progress: bool = False
             ) -> tuple[Sketcher, dict[int, Features]]:
    """Fits the sketch maps on a seeded sample of `samples`.

    Returns:
        The maps, and the features of the fit sample by corpus index, so that the shards holding those
        samples need no second forward pass (for a corpus no larger than the fit sample: none at all).
    """
    g = torch.Generator().manual_seed(config.sketch.seed)
    order = torch.randperm(len(samples), generator=g)[: config.sketch.fit_samples].sort().values.tolist()
    pairs = [samples[i].as_input() for i in order]
    cache: dict[int, Features] = {}
    parts = []
    # the fit's vocabulary pass runs on the model's device too
    fwd = dataclasses.replace(ForwardConfig.of_build(config), on_device=True)
    for idx, f in iter_features(lm.model, lm.preprocessor, pairs, fwd, head, progress, "fit"):
        parts.append(f)
        host = f.to("cpu")
        for j, i in enumerate(idx):
            cache[order[i]] = host.select([j])
    return fit_sketcher(Features.concat(parts), head, config.sketch), cache


def maps_digest(sk: Sketcher) -> str:
    """sha256 over the sketch maps' arrays (names, dtypes, shapes, bytes): what a build with given maps is keyed by."""
    h = hashlib.sha256()
    for name, arr in sorted(sk.arrays().items()):
        a = np.ascontiguousarray(arr)
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _save_maps(build: Build, sk: Sketcher) -> None:
    for name, arr in sk.arrays().items():
        build.put_array(name, arr)


class _ToHost:
    """Device → host copies of what a shard stores. On a GPU they go into pinned memory asynchronously
    (`wait` before reading them), so the copies overlap the next batch's work; on a CPU they are no-ops."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.current_stream().synchronize()


def encode_shard(lm: LoadedModel, head: Head, sk: Sketcher, samples: Sequence[Sample], config: BuildConfig,
                 bar=None, known: Sequence[Features | None] | None = None, norms: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Forward pass + sketch for one shard → (per-sample arrays, per-token arrays, token offsets, metadata
    rows), in sample order.

    Everything per token is computed on the model's device, fused in one pass over the vocabulary per
    batch (log-partition, bucketed residuals, top probabilities, ‖G‖); only what the shard stores is
    copied to the host (sketches, norms, hidden states in the re-rank dtype, targets, log-partitions, top
    probabilities). The "recompute" tier stores of the tokens their targets alone (what a query's new forward
    pass of the row is checked against) and no top probabilities.

    Args:
        head: the unembedding on the model's device (float32).
        known: per sample, its features if already computed (by the fit), else None.
        norms: also store ‖G‖ of every sample ("g_norm", for the calibrated cosine of answers); False only
            when adding to an index built before norms were stored (its shards must keep one schema).
    """
    device = head.weight.device
    skd = sk.to(device, head.weight.dtype)
    known = list(known) if known is not None else [None] * len(samples)
    todo = [j for j, f in enumerate(known) if f is None]
    batches: Iterable[tuple[list[int], Features]] = []
    if len(todo) < len(samples):
        have = [j for j, f in enumerate(known) if f is not None]
        batches = [(have, Features.concat([known[j] for j in have]))]
    if todo:
        pairs = [samples[j].as_input() for j in todo]
        fwd = dataclasses.replace(ForwardConfig.of_build(config), on_device=True)
        batches = itertools.chain(batches, (([todo[i] for i in idx], f) for idx, f in iter_features(
            lm.model, lm.preprocessor, pairs, fwd, head, with_lse=False)))
    host = _ToHost(device)
    states = config.stores_states
    half = states and RERANK_NUMPY[config.rerank_dtype] == np.float16
    top = config.rerank_top if states else 0
    rows_per_block = 4096 if device.type == "cuda" else 512
    order: list[int] = []
    lengths: list[torch.Tensor] = []
    out: dict[str, list[torch.Tensor]] = {}
    for idx, f in batches:
        h, y = f.h.to(device), f.y.to(device)
        if half:  # everything stored is computed from the h that is stored
            h = h.half().to(h.dtype)
        vp = vocab_pass(h, y, head, skd.bucket, skd.sign, skd.buckets, top, rows=rows_per_block,
                        offsets=f.offsets if norms else None)
        per = {"sketch": sketch_from_residuals(Features(h, y, vp.lse, f.offsets), vp.res, skd.projection),
               "y": y.int()}
        if states:
            per |= {"h": h.half() if half else h, "lse": vp.lse}
        if norms:
            per["g_norm"] = vp.g_sq.clamp(min=0).sqrt()
        if config.normalize == "unit":  # the sketch of G / ‖G‖ (a row with G = 0 has value 0 to every query)
            per["sketch"] = per["sketch"] * unit_scale(per["g_norm"])[:, None]
        if vp.top is not None:
            per |= {"top_ids": vp.top.ids.int(), "top_p": vp.top.probs, "tail_l2": vp.top.tail_l2}
        for name, t in per.items():
            out.setdefault(name, []).append(host(t))
        lengths.append(f.lengths)
        order.extend(idx)
        if bar is not None:
            bar.update(len(idx))
    host.wait()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    lens = torch.cat(lengths)
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lens, 0)
    src, new_offsets = token_rows(offsets, inverse)  # token rows of the concatenation, in sample order
    arrays = {"sketch": torch.cat(out["sketch"])[inverse].float().numpy()}
    if norms:
        arrays["g_norm"] = torch.cat(out["g_norm"])[inverse].float().numpy()
    tokens = {name: torch.cat(out[name])[src].numpy() for name in ("h", "y", "lse", "top_ids", "top_p", "tail_l2")
              if name in out}
    return arrays, tokens, new_offsets.numpy().astype(np.int64), [stored_row(s) for s in samples]


class BackgroundWriter:
    """Writes shards on one background thread while the next shard is computed (at most one in flight).

    A failed write is raised by the next `submit` or by `close`; the shard then simply is not done, and a
    rerun of the build writes it (shards are written atomically, store.py).
    """

    def __init__(self, build: Build) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._build = build
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="forvalue-shard-writer")
        self._pending = None

    def submit(self, i: int, arrays: dict, rows: list[dict], tokens: dict, offsets: np.ndarray) -> None:
        self.wait()
        self._pending = self._pool.submit(self._build.write_shard, i, arrays, rows, token_arrays=tokens,
                                          offsets=offsets)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _first_stage_info(build: Build, n_shards: int, config: FirstStageConfig) -> dict:
    """Builds the first stage over the build's sketches and returns what the manifest records of it.

    A flat index is exact search over the shards' sketch arrays, so it is not stored a second time:
    loading builds it from them (checksummed). An approximate one (firststage.py) is trained, measured
    against flat search (refused below config.min_recall) and written as a global file.
    """
    from .ann import ConcatRows, faiss_version, gpu_available
    from .firststage import build_first_stage

    vectors = ConcatRows([build.read_shard_array(i, "sketch") for i in range(n_shards)])
    index, info = build_first_stage(vectors, config)
    if index is not None:
        build.put_stream(info["file"], index.write)
    return {**info, "faiss_version": faiss_version(), "built_on": "gpu" if gpu_available() else "cpu"}


def build_index(root: str, samples: Sequence[Sample], lm: LoadedModel, config: BuildConfig = BuildConfig(),
                progress: bool = False, base: Version | None = None, write_shards=None, maps: Sketcher | None = None
                ) -> str:
    """Builds (or resumes) an index version over `samples` and publishes it; returns the version name.

    Args:
        base: for `add`: a published version whose maps and shards are reused; `samples` are appended.
        write_shards: a distributed build (raybuild.py): called as write_shards(build, todo, norms) with
            todo = [(shard index, its samples)] of the shards not done yet, once the maps are saved in the
            build; it has other processes write them (`store.ShardWriter`). A shard still missing
            afterwards is written here, so the version is never published with a hole.
        maps: sketch maps to use instead of fitting them (a new build only): e.g. those of another version,
            the reference an `index sync` equals (sync.py).
    """
    idx_root = IndexRoot(root)
    # what this update starts from: publishing is refused if CURRENT moved meanwhile (another build or add
    # published: its rows must not be hidden by this one), see IndexRoot.publish
    started_from = base.name if base is not None else idx_root.current()
    params = _params(lm, config)
    if not lm.accepts_images:  # before any work: the fit sample may hold no image sample
        refuse_images([s.as_input() for s in samples], lm.name)
    # taken-down samples never come back: leave them out of the input (see deletion.py)
    takedowns = current_takedowns(idx_root)
    if takedowns:
        kept = [s for s in samples if s.id not in takedowns]
        if len(kept) != len(samples):
            log.info("leaving out %d taken-down sample(s) (index delete)", len(samples) - len(kept))
        samples = kept
        if not samples and base is None:
            raise DataError("every sample of the input was taken down from this index (index delete); nothing "
                            "to build", path=str(idx_root.path))
    base_ids: list[str] = []  # the base version's ids in row order (read once: duplicates, then takedowns)
    if base is not None:
        _check_compatible(base.manifest, params)
        base_ids = _row_ids(base)
        samples = _new_rows(base, base_ids, samples)
        if not samples:
            return base.name
    corpus = corpus_fingerprint(samples)
    key = {"params": params, "corpus": corpus, "base": base.name if base is not None else None}
    if maps is not None:
        if base is not None:
            raise ValueError("maps are those of the base when adding to it; pass one or the other")
        key["maps"] = maps_digest(maps)
    key_src = json.dumps(key, sort_keys=True)
    build = idx_root.open_build(hashlib.sha256(key_src.encode()).hexdigest()[:24])
    try:
        return _build(idx_root, build, samples, lm, config, params, corpus, progress, base, base_ids, write_shards,
                      started_from, maps)
    except BaseException:
        build.close()  # unpublished: its finished shards stay for a rerun, its lock goes
        raise


def _build(idx_root: IndexRoot, build: Build, samples: Sequence[Sample], lm: LoadedModel, config: BuildConfig,
           params: dict, corpus: str, progress: bool, base: Version | None, base_ids: list[str], write_shards,
           started_from: str | None, maps: Sketcher | None = None) -> str:
    """The body of `build_index` once the build is open: maps, shards, first stage, publication."""
    device = next(lm.model.parameters()).device
    head = Head.from_model(lm.model).to(device)
    t0 = time.perf_counter()
    # ‖G‖ per sample: always in a new index; in an added-to one only if its first shards have it
    norms = base is None or "g_norm" in base.manifest["arrays"]
    sk, fitted, first = _open_maps(build, base, lm, head, samples, config, progress, maps)
    n_shards = _write_shards(build, lm, head, sk, samples, config, first, fitted, norms, write_shards, progress)
    counts = [int(build.read_shard_array(i, "offsets").shape[0] - 1) for i in range(n_shards)]
    manifest = {
        **params,
        "forvalue_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus_fingerprint": corpus,
        "base_version": base.name if base is not None else None,
        "n_samples": sum(counts),
        "shard_sizes": counts,
        "index": _first_stage_info(build, n_shards, config.first_stage),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "calibration": {"rows": CALIBRATION_ROWS, "seed": config.sketch.seed},
        "forward": {"device": device.type, "dtype": lm.dtype_name,
                    "batch_tokens": config.batch_tokens, "max_batch": config.max_batch},
    }
    with takedown_lock(idx_root):  # a deletion finishing meanwhile is carried into this version too
        takedowns = current_takedowns(idx_root)
        if takedowns:
            rows = hidden_rows(base_ids + [s.id for s in samples], takedowns)
            build.put_json(DELETED_FILE, deleted_json(takedowns, rows))
            manifest["deleted"] = {"ids": len(takedowns), "rows": int(rows.size)}
        return idx_root.publish(build, manifest, expect_current=started_from)


def _open_maps(build: Build, base: Version | None, lm: LoadedModel, head: Head, samples: Sequence[Sample],
               config: BuildConfig, progress: bool, maps: Sketcher | None = None
               ) -> tuple[Sketcher, dict[int, Features], int]:
    """(the sketch maps, the fit samples' features by sample number, the first new shard's number).

    An added-to index keeps its base's maps (and links the base's shards on first use); a new build reads
    the maps a killed run of it saved, or fits them (whose features are then reused by the shards). The maps
    are written one file at a time: a build killed between two of them writes them again.
    """
    have_maps = all(build.has_file(n) for n in MAP_FILES)
    if base is not None:
        sk = Sketcher.from_arrays({n: base.global_array(n) for n in MAP_FILES}, config.sketch.buckets)
        if not have_maps:
            build.link_shards_from(base, 0)
            _save_maps(build, sk)
        return sk, {}, len(base.manifest["shards"])
    if have_maps:
        return Sketcher.from_arrays({n: build.read_array(n) for n in MAP_FILES}, config.sketch.buckets), {}, 0
    if maps is not None:
        _save_maps(build, maps)
        return maps, {}, 0
    sk, fitted = fit_maps(lm, head, samples, config, progress)
    _save_maps(build, sk)
    return sk, fitted, 0


def _write_shards(build: Build, lm: LoadedModel, head: Head, sk: Sketcher, samples: Sequence[Sample],
                  config: BuildConfig, first: int, fitted: dict[int, Features], norms: bool, write_shards,
                  progress: bool) -> int:
    """Encode and write the shards of `samples` not done yet (numbered from `first`; by `write_shards`, a
    distributed writer, when given, then here what it left); returns the build's shard count."""
    n_new = (len(samples) + config.shard_size - 1) // config.shard_size
    done = set(build.done_shards())
    if write_shards is not None:
        write_shards(build, [(first + j, samples[j * config.shard_size : (j + 1) * config.shard_size])
                             for j in range(n_new) if first + j not in done], norms)
        done = set(build.refresh())
        if any(first + j not in done for j in range(n_new)):
            log.warning("the distributed build left shards %s unwritten; writing them here",
                        [first + j for j in range(n_new) if first + j not in done])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        todo = sum(min(config.shard_size, len(samples) - j * config.shard_size)
                   for j in range(n_new) if first + j not in done)
        bar = tqdm(total=todo, desc="index", unit="sample", dynamic_ncols=True)
    writer = BackgroundWriter(build)  # shard j is written while shard j + 1 is computed
    try:
        for j in range(n_new):
            if first + j in done:
                continue
            a = j * config.shard_size
            chunk = samples[a : a + config.shard_size]
            known = [fitted.pop(a + i, None) for i in range(len(chunk))]
            arrays, tokens, offsets, rows = encode_shard(lm, head, sk, chunk, config, bar, known, norms)
            writer.submit(first + j, arrays, rows, tokens, offsets)
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    return first + n_new


def _new_rows(base: Version, base_ids: list[str], samples: Sequence[Sample]) -> list[Sample]:
    """The samples `index add` appends to `base`: a row the index holds already, with the same content (the same
    content id, or the same explicit id and the same scored content), is skipped, so adding a file twice, or one
    that overlaps, adds only its new rows; an explicit id the index holds with other content is refused.

    Raises:
        DataError: naming the first such id.
    """
    where = {i: r for r, i in enumerate(base_ids)}
    dups = [s for s in samples if s.id in where]
    if not dups:
        return list(samples)
    stored = base.rows([where[s.id] for s in dups])
    for s, row in zip(dups, stored):
        if not s.auto_id and content_key(row) != content_key(stored_row(s)):
            raise DataError(f"id {s.id!r} is already in index version {base.name} with other content; give new "
                            "samples new ids, or update changed rows with forvalue index sync",
                            path=s.source or None, row=s.row if s.row >= 0 else None)
    log.warning("skipped %d row(s) already in index version %s (same id and content)", len(dups), base.name)
    skip = {s.id for s in dups}
    return [s for s in samples if s.id not in skip]


def _row_ids(version: Version) -> list[str]:
    """Sample ids of every row of `version`, in row order."""
    codes, keys = FieldIndex(version.rows, version.n).codes("id")
    return [keys[c] for c in codes.tolist()]


def storage_summary(manifest: dict) -> dict:
    """Bytes on disk per sample, by role, from the manifest's file list.

    first_stage: the sketch vectors (the flat FAISS index is built from them on load); rerank: per-token hidden states, targets,
    log-partitions and offsets; metadata: the stored rows; maps: the fitted sketch maps (per index).
    """
    roles = {"first_stage": 0, "rerank": 0, "metadata": 0, "maps": 0, "other": 0}
    for path, info in manifest.get("files", {}).items():
        name = path.rsplit("/", 1)[-1]
        if name in ("sketch.npy", "index.faiss"):
            role = "first_stage"
        elif name in ("h.npy", "y.npy", "lse.npy", "offsets.npy", "top_ids.npy", "top_p.npy", "tail_l2.npy",
                      "g_norm.npy"):
            role = "rerank"
        elif name in ("metadata.jsonl", "rowindex.npy"):
            role = "metadata"
        elif name in MAP_FILES:
            role = "maps"
        else:
            role = "other"
        roles[role] += int(info["bytes"])
    n = max(int(manifest.get("n_samples", 0)), 1)
    per = {f"{k}_bytes_per_sample": round(v / n, 1) for k, v in roles.items() if k != "maps"}
    return {**per, "maps_bytes": roles["maps"], "total_bytes": sum(roles.values())}


# What `index add` must share with the index it extends; the model by what it is (fingerprints, shape), never by
# the path or name it was given (`--model tiny` and `--model /abs/path/tiny` are the same model).
def kept_config(manifest: Mapping[str, Any]) -> BuildConfig:
    """The BuildConfig fields a version's manifest fixes for every build on top of it (`index add`, `index
    sync`; `_COMPATIBLE_KEYS`): token scope, max_length, re-rank store and top probabilities, normalisation and
    the sketch's shape; the other fields are BuildConfig's defaults."""
    m, sk = manifest, manifest["sketch"]
    return BuildConfig(
        tokens=m["tokens"], max_length=m["max_length"], rerank_dtype=m["rerank_dtype"],
        rerank_top=int(m.get("rerank_top", 0)), normalize=m.get("normalize", "none"),
        sketch=SketchConfig(rank=sk["rank"], buckets=sk["buckets"], dedicated=sk["dedicated"], seed=sk["seed"],
                            fit_samples=sk["fit_samples"]),
    )


_COMPATIBLE_KEYS = ("model", "tokens", "max_length", "sketch", "rerank_dtype", "rerank_top", "normalize")
_MODEL_NAME_KEYS = frozenset({"name"})
# what an operator passes to get the value the index has
_WHAT_TO_PASS = {
    "model": "pass the model the index was built with (--model {built})",
    "forward_dtype": "pass the dtype the index was built with (--dtype)",
}


def _differences(path: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) of every leaf where `old` and `new` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if path == "model" and key in _MODEL_NAME_KEYS:
                continue
            out += _differences(f"{path}.{key}", old.get(key), new.get(key))
        return out
    return [] if old == new else [(path, old, new)]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:16] + "..." if isinstance(value, str) and len(value) > 24 else text


def _check_compatible(manifest: dict, params: dict) -> None:
    """Refuse to add to `manifest`'s index samples encoded with `params`, naming the first field that differs.

    Raises:
        IndexMismatchError: "cannot add to this index: its model.fingerprint is ..., the new samples' is ...;
            pass the model the index was built with (--model NAME)".
    """
    defaults = {"rerank_top": 0, "normalize": "none"}  # indexes built before the keys existed
    diffs = []
    for key in _COMPATIBLE_KEYS:
        diffs += _differences(key, manifest.get(key, defaults.get(key)), params.get(key))
    if not diffs:
        return
    field, old, new = diffs[0]
    top = field.split(".", 1)[0]
    built = manifest.get("model", {}).get("name", "?")
    advice = _WHAT_TO_PASS.get(top, "build a new index with the options you want (index add keeps the "
                                    "index's tokens, max_length and sketch options)").format(built=built)
    more = f" (and {len(diffs) - 1} more field(s))" if len(diffs) > 1 else ""
    raise IndexMismatchError(
        f"cannot add to this index: its {field} is {_short(old)}, the new samples' would be {_short(new)}{more}; "
        f"{advice}"
    )