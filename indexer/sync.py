"""`index sync`: bring an index to a corpus by content, paying a forward pass only for what changed.

The corpus is compared with CURRENT by row id and a content key (`content_key`): sha256 of what is scored
(prompt, response, the image's sha256) and of the settings it is scored with (model and tokenizer fingerprints,
token scope, max_length, EOS, forward dtype: the manifest's). A row whose id and key are in CURRENT is reused:
its sketch, re-rank data and norm are copied (a whole shard is hard-linked when its rows are unchanged, in the
same order, with the same metadata), and its metadata is the corpus's (`metadata_updated` counts the rows whose
metadata alone changed); a new or changed row is encoded with CURRENT's sketch maps; a row of CURRENT that the
corpus no longer holds is dropped. The new version holds the corpus's rows in corpus order, so it equals a fresh
build of the corpus with the same maps (`build_index(..., maps=...)`): the same ids, scores (to float
tolerance: a forward pass may batch a row with other rows) and first-stage candidates. Rows taken down
(`index delete`) stay out, and the takedown record is carried forward, as a build does.

Publishing is a compare-and-swap against the version the sync started from: when another update lands first,
the sync starts again from the new CURRENT (`SyncConfig.retries` times, then IndexChangedError), so what the
other update published is never hidden by a version computed without it (a row it added that the corpus does
not hold is then dropped, as the corpus is the truth). A killed sync resumes: its build is keyed by the base
version and the corpus's rows, its shards are planned deterministically and written atomically.

The maps stay CURRENT's, so they drift from the corpus as it changes. A sync measures on the new version the
sketch recall (`sketch_recall`: the share of the exact top-k of held-out rows that lies in the sketch's top
candidates) and counts the rows encoded since the maps were fit; it advises a refit (`SyncConfig.refit`: a full
build with new maps) when the recall is below `min_recall` or that share above `max_changed`. On an index of the
"recompute" storage tier (no hidden states stored) the recall's rows are encoded again for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import __version__
from .build import (
    BackgroundWriter, _check_compatible, _first_stage_info, _params, build_index, corpus_fingerprint, encode_shard,
    kept_config,
)
from .config import APPROXIMATE_KINDS, BuildConfig, FirstStageConfig, SyncConfig
from .data import Sample, content_key, sample_of_row, stored_row
from .deletion import DELETED_FILE, deleted_json, deleted_of, hidden_rows, takedown_lock
from .errors import DataError, IndexChangedError
from .features import Features, ForwardConfig, Head
from .formats import Schema
from .forward import batch_sizes, extract_features, refuse_images
from .model import LoadedModel
from .score import exact_scores, g_norms, unit_scale
from .sketch import MAP_FILES, Sketcher
from .store import Build, IndexRoot, Version
from .store_format import locate_rows

log = logging.getLogger("forvalue.indexer.sync")

SYNC_PREFIX = "sync-"  # build keys of syncs


# ---------------------------------------------------------------------------------------------- the plan


def scoring_settings(manifest: Mapping[str, Any]) -> str:
    """What decides a row's features besides its content, from a manifest (or build params), as one canonical
    string: model and tokenizer fingerprints (the chat template is the tokenizer's), token scope, max_length,
    EOS, forward dtype, and how rows become tokens (the kept schema's template and turns, formats.py)."""
    m = manifest["model"]
    schema = Schema.from_json(manifest.get("data"))
    return json.dumps({"model": m["fingerprint"], "tokenizer": m["tokenizer_fingerprint"],
                       "tokens": manifest["tokens"], "max_length": manifest["max_length"],
                       "add_eos": manifest.get("add_eos", True), "forward_dtype": manifest.get("forward_dtype"),
                       "template": schema.template, "turns": schema.turns}, sort_keys=True)


class PlannedShard(NamedTuple):
    """One shard of the new version: the corpus positions it holds, and the base shard it links (or None)."""

    positions: np.ndarray
    link: int | None


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """What a sync does. src[p]: the base row corpus row p reuses, -1 = encode it."""

    src: np.ndarray
    shards: list[PlannedShard]
    dropped: int
    metadata_updated: int

    @property
    def reused(self) -> int:
        return int((self.src >= 0).sum())

    @property
    def encoded(self) -> int:
        return int((self.src < 0).sum())

    def unchanged(self, n_base_shards: int) -> bool:
        """The new version would hold the base's shards as they are: nothing to publish."""
        return (not self.dropped and len(self.shards) == n_base_shards
                and all(s.link == i for i, s in enumerate(self.shards)))


def plan_sync(old_rows: Sequence[Mapping[str, Any]], old_starts: np.ndarray, new_rows: Sequence[Mapping[str, Any]],
              settings: tuple[str, str], shard_size: int) -> SyncPlan:
    """Match the corpus (`new_rows`, stored rows in corpus order) with the base (`old_rows`, with (n_shards + 1,)
    cumulative shard rows `old_starts`) by id and content key, and cut the corpus into shards: a run of rows that
    is a whole base shard, unchanged, in order, with the same metadata, is linked; the rows between such runs go
    into shards of at most `shard_size` rows, in corpus order.

    Args:
        settings: (`scoring_settings` of the base, of the sync): rows encoded otherwise are encoded again.
    """
    by_id = {str(row["id"]): r for r, row in enumerate(old_rows)}
    src = np.full(len(new_rows), -1, dtype=np.int64)
    same = np.zeros(len(new_rows), dtype=bool)
    for p, row in enumerate(new_rows):
        r = by_id.get(str(row["id"]))
        if r is not None and content_key(old_rows[r], settings[0]) == content_key(row, settings[1]):
            src[p] = r
            same[p] = old_rows[r] == row
    shard_at = {int(old_starts[s]): s for s in range(len(old_starts) - 1) if old_starts[s + 1] > old_starts[s]}
    shards: list[PlannedShard] = []
    pending: list[int] = []

    def flush() -> None:
        for a in range(0, len(pending), shard_size):
            shards.append(PlannedShard(np.asarray(pending[a : a + shard_size], dtype=np.int64), None))
        pending.clear()

    p = 0
    while p < len(new_rows):
        s = shard_at.get(int(src[p]))
        if s is not None:
            a, b = int(old_starts[s]), int(old_starts[s + 1])
            run = slice(p, p + b - a)
            if p + b - a <= len(new_rows) and np.array_equal(src[run], np.arange(a, b)) and same[run].all():
                flush()
                shards.append(PlannedShard(np.arange(p, p + b - a, dtype=np.int64), s))
                p += b - a
                continue
        pending.append(p)
        p += 1
    flush()
    gone = set(by_id) - {str(row["id"]) for row in new_rows}  # left the corpus (an edited row is not dropped)
    return SyncPlan(src, shards, len(gone), int(((src >= 0) & ~same).sum()))


# ------------------------------------------------------------------------------------------ shard contents


def merge_rows(parts: Sequence[tuple[np.ndarray, dict, dict, np.ndarray]], dtypes: Mapping[str, str]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Rows from several sources → one shard's (per-sample arrays, per-token arrays, offsets), rows sorted by
    position.

    Args:
        parts: (positions (n_j,), per-sample arrays (n_j, ...), per-token arrays (T_j, ...), offsets (n_j + 1,)).
        dtypes: array name → the dtype the shard stores it in (the base version's).
    """
    pos = np.concatenate([p[0] for p in parts])
    order = np.argsort(pos, kind="stable")
    names = list(parts[0][1])
    arrays = {n: np.concatenate([np.asarray(p[1][n], dtype=np.dtype(dtypes[n])) for p in parts])[order]
              for n in names}
    lengths = np.concatenate([np.diff(np.asarray(p[3], dtype=np.int64)) for p in parts])
    starts = np.concatenate([np.asarray(p[3][:-1], dtype=np.int64) + sum(int(q[3][-1]) for q in parts[:j])
                             for j, p in enumerate(parts)])
    offsets = np.zeros(pos.size + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=offsets[1:])
    src = np.repeat(starts[order] - offsets[:-1], lengths[order]) + np.arange(offsets[-1], dtype=np.int64)
    tokens = {n: np.concatenate([np.asarray(p[2][n], dtype=np.dtype(dtypes[n])) for p in parts])[src]
              for n in parts[0][2]}
    return arrays, tokens, offsets


class _Encoder(NamedTuple):
    lm: LoadedModel
    head: Head
    sketcher: Sketcher
    config: BuildConfig
    norms: bool


def shard_content(base: Version, positions: np.ndarray, src: np.ndarray, samples: Sequence[Sample], enc: _Encoder,
                  bar=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, int]:
    """(per-sample arrays, per-token arrays, offsets, rows encoded) of a written shard: reused rows copied from
    `base`, the others encoded (`build.encode_shard`), in position order."""
    s = src[positions]
    parts = []
    reuse = positions[s >= 0]
    if reuse.size:
        old = s[s >= 0]
        kinds = {n: spec["kind"] for n, spec in base.arrays.items()}
        tok = base.token_rows(old, [n for n, k in kinds.items() if k == "token"])
        offsets = tok.pop("offsets")
        parts.append((reuse, {n: base.take(n, old) for n, k in kinds.items() if k == "sample"}, tok, offsets))
    new = positions[s < 0]
    if new.size:
        arrays, tokens, offsets, _ = encode_shard(enc.lm, enc.head, enc.sketcher, [samples[p] for p in new],
                                                  enc.config, bar, None, enc.norms)
        parts.append((new, arrays, tokens, offsets))
    dtypes = {n: spec["dtype"] for n, spec in base.arrays.items()}
    arrays, tokens, offsets = merge_rows(parts, dtypes)
    return arrays, tokens, offsets, int(new.size)


def _write_planned(build: Build, base: Version, plan: SyncPlan, samples: Sequence[Sample], rows: Sequence[dict],
                   enc: _Encoder, progress: bool) -> tuple[int, int]:
    """Write the plan's shards not done yet (a resumed sync skips the rest); returns (rows encoded now, shards
    found done)."""
    done = set(build.done_shards())
    todo = sum(int((plan.src[s.positions] < 0).sum()) for i, s in enumerate(plan.shards)
               if i not in done and s.link is None)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc="sync", unit="sample", dynamic_ncols=True)
    writer = BackgroundWriter(build)  # shard i is written while shard i + 1 is computed
    encoded = 0
    try:
        for i, shard in enumerate(plan.shards):
            if i in done:
                continue
            if shard.link is not None:
                writer.wait()
                build.link_shard_from(base, shard.link, i)
                continue
            arrays, tokens, offsets, n_new = shard_content(base, shard.positions, plan.src, samples, enc, bar)
            encoded += n_new
            writer.submit(i, arrays, [rows[p] for p in shard.positions], tokens, offsets)
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    return encoded, len(done & set(range(len(plan.shards))))


# ------------------------------------------------------------------------------------------------ recall


def sketch_recall(fq: Features, sq: torch.Tensor, fp: Features, sp: torch.Tensor, head: Head, k: int,
                  candidates: int, unit: bool = False) -> dict[str, float]:
    """Recall of the sketch first stage against exact For-Value: for each query row, the share of its exact
    top-k among the pool rows (most and least valuable) that lies in its `candidates` best pool rows by sketch
    inner product, averaged over the queries.

    Args:
        fq, sq: the queries' features and sketches (q, D). fp, sp: the pool's (p, D).
        unit: the index is unit-normalised (BuildConfig.normalize): values are divided by the pool row's ‖G‖.
    """
    S = exact_scores(fq, fp, head)  # (q, p)
    if unit:
        S = S * unit_scale(g_norms(fp, head))[None, :]
    A = sq.float() @ sp.float().T
    k, c = min(k, S.shape[1]), min(candidates, S.shape[1])
    out = {}
    for direction, sign in (("most", 1.0), ("least", -1.0)):
        truth = torch.topk(sign * S, k, dim=1).indices
        found = torch.topk(sign * A, c, dim=1).indices
        hit = (truth.unsqueeze(2) == found.unsqueeze(1)).any(2).float()
        out[direction] = round(float(hit.mean()), 4)
    return out


def recall_rows(n: int, config: SyncConfig, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(query rows, pool rows), disjoint and seeded, for `sketch_recall` on a version of n rows; None when too
    small to measure (fewer pool rows than recall_k + 1)."""
    q = min(config.recall_queries, n // 4)
    p = min(config.recall_pool, n - q)
    if q < 1 or p <= config.recall_k:
        return None
    rows = np.random.default_rng(seed).choice(n, q + p, replace=False)
    return np.sort(rows[:q]), np.sort(rows[q:])


def _encoded_rows(lm: LoadedModel, head: Head | None, samples: Sequence[Sample], config: BuildConfig) -> Features:
    """Features of `samples` from a forward pass, on the host: the rows of an index that stores no hidden states
    (the "recompute" storage tier), as a query encodes its candidates (`Index.recompute_features`); `head` on the
    model's device, or None (made from the model)."""
    return extract_features(lm.model, lm.preprocessor, [s.as_input() for s in samples], ForwardConfig.of_build(config),
                            head).to("cpu")


def _build_rows(build: Build, n_shards: int, rows: np.ndarray, encode: Callable[[np.ndarray], Features] | None = None
                ) -> tuple[Features, torch.Tensor]:
    """(stored features, sketches) of rows of an unpublished build, in the order given; `encode(rows)` gives the
    features instead where the build stores no hidden states."""
    if encode is not None:
        counts = [build.shard_info(i)["rows"] for i in range(n_shards)]
        shard, local = locate_rows(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), rows)
        sk = [np.asarray(build.read_shard_array(s, "sketch")[j], dtype=np.float32)
              for s, j in zip(shard.tolist(), local.tolist())]
        return encode(rows), torch.from_numpy(np.stack(sk))
    counts = [build.shard_info(i)["rows"] for i in range(n_shards)]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shard, local = locate_rows(starts, rows)
    cache: dict[int, dict[str, np.ndarray]] = {}
    h, y, lse, lengths, sk = [], [], [], [], []
    for s, j in zip(shard.tolist(), local.tolist()):
        if s not in cache:
            cache[s] = {n: build.read_shard_array(s, n) for n in ("h", "y", "lse", "offsets", "sketch")}
        arr = cache[s]
        a, b = int(arr["offsets"][j]), int(arr["offsets"][j + 1])
        h.append(np.asarray(arr["h"][a:b], dtype=np.float32))
        y.append(np.asarray(arr["y"][a:b], dtype=np.int64))
        lse.append(np.asarray(arr["lse"][a:b], dtype=np.float32))
        lengths.append(b - a)
        sk.append(np.asarray(arr["sketch"][j], dtype=np.float32))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    f = Features(torch.from_numpy(np.concatenate(h)), torch.from_numpy(np.concatenate(y)),
                 torch.from_numpy(np.concatenate(lse)), torch.from_numpy(offsets))
    return f, torch.from_numpy(np.stack(sk))


def _version_rows(version: Version, rows: np.ndarray, encode: Callable[[list[Sample]], Features] | None = None
                  ) -> tuple[Features, torch.Tensor]:
    """(stored features, sketches) of rows of a published version; `encode(samples)` encodes the rows' stored
    samples instead where the version stores no hidden states."""
    sketches = torch.from_numpy(np.asarray(version.take("sketch", rows), dtype=np.float32))
    if "h" not in version.arrays and encode is not None:
        return encode([sample_of_row(r) for r in version.rows(rows)]), sketches
    d = version.token_rows(rows, ["h", "y", "lse"])
    f = Features(torch.from_numpy(np.asarray(d["h"], dtype=np.float32)),
                 torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
                 torch.from_numpy(np.asarray(d["lse"], dtype=np.float32)), torch.from_numpy(d["offsets"]))
    return f, torch.from_numpy(np.asarray(version.take("sketch", rows), dtype=np.float32))


def measure_recall(read, n: int, head: Head, config: SyncConfig, seed: int, unit: bool = False) -> dict | None:
    """The sketch recall of a version of n rows whose rows `read(rows)` gives as (features, sketches); None when
    not measured (recall_queries = 0, or too few rows)."""
    picked = recall_rows(n, config, seed)
    if picked is None:
        return None
    t0 = time.perf_counter()
    (fq, sq), (fp, sp) = read(picked[0]), read(picked[1])
    r = sketch_recall(fq, sq, fp, sp, head.to("cpu"), config.recall_k, config.recall_candidates, unit)
    return {**r, "k": config.recall_k, "candidates": min(config.recall_candidates, int(picked[1].size)),
            "queries": int(picked[0].size), "pool": int(picked[1].size), "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------- the sync


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What `sync_index` did (`as_dict`: the CLI's JSON).

    Attributes:
        before, after: CURRENT before and after (equal when nothing was published).
        reused, encoded, dropped, metadata_updated: rows of the corpus reused (no forward pass), encoded (new or
            changed), rows of `before` whose id left the corpus, and reused rows whose metadata alone changed.
        linked_shards: shards of `before` hard-linked whole. resumed_shards: shards a killed run had finished.
        encoded_now: rows this process encoded (less than `encoded` when resumed).
        recall: the sketch recall of `after` (`measure_recall`), the first stage's recall against flat search
            ("first_stage", approximate first stages only), or None.
        changed_share: rows encoded since the maps were fit / rows of `after`.
        refit_advised, reasons: whether a refit is worth it, and why (recall, changed share).
        refit: this run was a full rebuild with new maps. retries: times it started again (CURRENT moved).
    """

    before: str
    after: str
    rows: int
    reused: int
    encoded: int
    dropped: int
    metadata_updated: int
    linked_shards: int = 0
    resumed_shards: int = 0
    encoded_now: int = 0
    seconds: float = 0.0
    recall: dict | None = None
    changed_share: float = 0.0
    refit_advised: bool = False
    reasons: tuple[str, ...] = ()
    refit: bool = False
    retries: int = 0

    @property
    def published(self) -> bool:
        return self.after != self.before

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons), "published": self.published}


def build_config_of(manifest: Mapping[str, Any], batch_tokens: int, max_batch: int) -> BuildConfig:
    """The BuildConfig a version was built with, as far as its manifest says (its largest shard as the shard
    size; an approximate first stage with automatic nlist and nprobe, its refine and min_recall; the kept data
    schema)."""
    m, info = manifest, manifest.get("index", {})
    fs: dict[str, Any] = {"kind": "auto" if info.get("auto") else info.get("kind", "auto")}
    if info.get("auto"):
        fs["approx_threshold"] = int(info["auto"]["threshold"])
    if info.get("kind") in APPROXIMATE_KINDS:
        fs.update(refine=int(info["refine"]), min_recall=float(info["recall"]["min_recall"]))
        if "pq_m" in info:
            fs["pq_m"] = int(info["pq_m"])
        fs["norm_buckets"] = int(info.get("norm_buckets", 1))
    return dataclasses.replace(
        kept_config(m), shard_size=max(m.get("shard_sizes") or [BuildConfig.shard_size]), batch_tokens=batch_tokens,
        max_batch=max_batch, first_stage=FirstStageConfig(**fs), schema=Schema.from_json(m.get("data")))


def sync_index(root: str, samples: Sequence[Sample], lm: LoadedModel, config: SyncConfig = SyncConfig(),
               batch_tokens: int | str = "auto", progress: bool = False) -> SyncResult:
    """Bring the index at `root` to the corpus `samples` (see the module doc) and publish one new version.

    Args:
        samples: the whole corpus as it is now, in the order the new version holds it.
        batch_tokens: padded tokens per forward batch, or "auto" (sized to the device).

    Raises:
        DataError: duplicate ids, an empty corpus, nothing published yet. IndexMismatchError: `lm` is not the
            index's model. IndexChangedError: CURRENT kept moving (`config.retries` times).
    """
    t0 = time.perf_counter()
    for attempt in range(config.retries + 1):
        try:
            result = _sync_once(IndexRoot(root), samples, lm, config, batch_tokens, progress)
            return dataclasses.replace(result, seconds=round(time.perf_counter() - t0, 3), retries=attempt)
        except IndexChangedError as exc:
            if attempt == config.retries:
                raise
            log.warning("%s; starting again from the new CURRENT", exc)
    raise AssertionError("unreachable")


def _check_corpus(samples: Sequence[Sample], rows: Sequence[Mapping[str, Any]], path: str) -> None:
    if not samples:
        raise DataError("the corpus holds no row to index (or every row of it was taken down: index delete)",
                        path=path)
    seen: dict[str, int] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"duplicate id {s.id!r} in the corpus; ids must be unique", path=s.source or path,
                            row=s.row if s.row >= 0 else None)
        seen[s.id] = 1


def _sync_once(idx_root: IndexRoot, samples: Sequence[Sample], lm: LoadedModel, config: SyncConfig,
               batch_tokens: int | str, progress: bool) -> SyncResult:
    """One attempt: plan against CURRENT, write, measure, publish (compare-and-swap against that CURRENT)."""
    with idx_root.load() as base:
        bt, mb = batch_sizes(batch_tokens, lm.model, int(base.manifest["max_length"]))
        bconf = build_config_of(base.manifest, bt, mb)
        params = _params(lm, bconf)
        _check_compatible(base.manifest, params)
        takedowns = deleted_of(base).ids
        samples = [s for s in samples if s.id not in takedowns]  # taken down: never back (deletion.py)
        if not lm.accepts_images:
            refuse_images([s.as_input() for s in samples], lm.name)
        rows = [json.loads(json.dumps(stored_row(s))) for s in samples]  # as they read back from the store
        _check_corpus(samples, rows, str(idx_root.path))
        if config.refit:
            return _refit(idx_root, base, samples, lm, bconf, config, progress)
        plan = plan_sync(base.rows(np.arange(base.n)), base.row_starts, rows,
                         (scoring_settings(base.manifest), scoring_settings(params)), bconf.shard_size)
        if plan.unchanged(base.n_shards):  # the advice from what the base's sync measured
            share, recall = _changed_share(base.manifest, 0, base.n), (base.manifest.get("sync") or {}).get("recall")
            reasons = _advice(recall, share, config)
            return SyncResult(base.name, base.name, base.n, base.n, 0, 0, 0, base.n_shards, recall=recall,
                              changed_share=share, refit_advised=bool(reasons), reasons=reasons)
        digest = hashlib.sha256(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)).hexdigest()
        key_src = json.dumps({"op": "sync", "params": params, "base": base.name, "rows": digest}, sort_keys=True)
        build = idx_root.open_build(SYNC_PREFIX + hashlib.sha256(key_src.encode()).hexdigest()[:24])
        try:
            return _publish_sync(idx_root, build, base, plan, samples, rows, lm, bconf, params, config, progress)
        except BaseException:
            build.close()  # unpublished: its finished shards stay for a rerun, its lock goes
            raise


def _changed_share(manifest: Mapping[str, Any], encoded: int, n: int) -> float:
    since = int((manifest.get("sync") or {}).get("encoded_since_fit", 0)) + encoded
    return round(since / max(n, 1), 4)


def _advice(recall: dict | None, share: float, config: SyncConfig) -> tuple[str, ...]:
    reasons = []
    if recall is not None and min(recall["most"], recall["least"]) < config.min_recall:
        reasons.append(f"sketch recall@{recall['k']} {min(recall['most'], recall['least']):.3f} is below "
                       f"--min-recall {config.min_recall}")
    if share > config.max_changed:
        reasons.append(f"{share:.1%} of the rows were encoded since the maps were fit, above --max-changed "
                       f"{config.max_changed:.0%}")
    return tuple(reasons)


def _publish_sync(idx_root: IndexRoot, build: Build, base: Version, plan: SyncPlan, samples: Sequence[Sample],
                  rows: Sequence[dict], lm: LoadedModel, bconf: BuildConfig, params: dict, config: SyncConfig,
                  progress: bool) -> SyncResult:
    """The body of a sync once its build is open: maps, shards, first stage, recall, publication."""
    t0 = time.perf_counter()
    for name in MAP_FILES:  # the maps stay the base's: unchanged rows stay valid
        if not build.has_file(name):
            build.link_global_from(base, name)
    device = next(lm.model.parameters()).device
    head = Head.from_model(lm.model).to(device)
    sk = Sketcher.from_arrays({n: base.global_array(n) for n in MAP_FILES}, bconf.sketch.buckets)
    enc = _Encoder(lm, head, sk, bconf, "g_norm" in base.arrays)
    encoded_now, resumed = _write_planned(build, base, plan, samples, rows, enc, progress)
    n_shards, n = len(plan.shards), len(rows)
    info = _first_stage_info(build, n_shards, bconf.first_stage)
    encode = None if bconf.stores_states else (lambda r: _encoded_rows(lm, head, [samples[i] for i in r], bconf))
    recall = measure_recall(lambda r: _build_rows(build, n_shards, r, encode), n, head, config, bconf.sketch.seed,
                            bconf.normalize == "unit")
    share = _changed_share(base.manifest, plan.encoded, n)
    reasons = _advice(recall, share, config)
    linked = sum(s.link is not None for s in plan.shards)
    record = {"base_version": base.name, "reused": plan.reused, "encoded": plan.encoded, "dropped": plan.dropped,
              "metadata_updated": plan.metadata_updated, "linked_shards": linked, "recall": recall,
              "encoded_since_fit": int(round(share * n)), "refit_advised": bool(reasons), "reasons": list(reasons)}
    manifest = {
        **params, "forvalue_version": __version__, "operation": "sync",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus_fingerprint": corpus_fingerprint(samples), "base_version": base.name, "n_samples": n,
        "shard_sizes": [int(s.positions.size) for s in plan.shards], "index": info,
        "build_seconds": round(time.perf_counter() - t0, 2), "sync": record,
        "calibration": base.manifest.get("calibration", {}),
        "forward": {"device": device.type, "dtype": lm.dtype_name, "batch_tokens": bconf.batch_tokens,
                    "max_batch": bconf.max_batch},
    }
    with takedown_lock(idx_root):  # the takedown record goes forward (a new deletion moved CURRENT: CAS fails)
        takedowns = deleted_of(base).ids
        if takedowns:
            hidden = hidden_rows([str(r["id"]) for r in rows], takedowns)
            build.put_json(DELETED_FILE, deleted_json(takedowns, hidden))
            manifest["deleted"] = {"ids": len(takedowns), "rows": int(hidden.size)}
        name = idx_root.publish(build, manifest, expect_current=base.name)
    return SyncResult(base.name, name, n, plan.reused, plan.encoded, plan.dropped, plan.metadata_updated, linked,
                      resumed, encoded_now, recall=_with_first_stage(recall, info), changed_share=share,
                      refit_advised=bool(reasons), reasons=reasons)


def _with_first_stage(recall: dict | None, info: Mapping[str, Any]) -> dict | None:
    if recall is None or "recall" not in info:
        return recall
    return {**recall, "first_stage": {d: info["recall"][d] for d in ("most", "least")}}


def _refit(idx_root: IndexRoot, base: Version, samples: Sequence[Sample], lm: LoadedModel, bconf: BuildConfig,
           config: SyncConfig, progress: bool) -> SyncResult:
    """A full build of the corpus with new maps (`build_index`, compare-and-swap against `base`)."""
    if idx_root.current() != base.name:
        raise IndexChangedError(f"{idx_root.path}: CURRENT moved to {idx_root.current()} while this sync started "
                                f"from {base.name}; nothing was published")
    name = build_index(str(idx_root.path), samples, lm, bconf, progress=progress)
    head = Head.from_model(lm.model)
    with idx_root.load(name, verify=False) as v:
        recall = measure_recall(lambda r: _version_rows(v, r, lambda s: _encoded_rows(lm, None, s, bconf)), v.n,
                                head, config, bconf.sketch.seed, bconf.normalize == "unit")
        recall = _with_first_stage(recall, v.manifest["index"])
    ids = {str(r["id"]) for r in base.rows(np.arange(base.n))}
    dropped = len(ids - {s.id for s in samples})
    return SyncResult(base.name, name, len(samples), 0, len(samples), dropped, 0, recall=recall, refit=True)
