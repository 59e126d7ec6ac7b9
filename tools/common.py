"""Shared by the tools/ scripts: features and exact scores cached on disk between runs (torch files), and the
index a benchmark queries."""

from __future__ import annotations

from pathlib import Path

import torch

from forvalue.indexer.features import Features, ForwardConfig
from forvalue.indexer.forward import extract_features
from forvalue.indexer.score import exact_scores


def cached_features(lm, head, samples, tokens: str, cache: Path | None, name: str) -> Features:
    """Features of `samples`, read from `cache/<name>-<tokens>.pt` when present, else computed and saved."""
    path = cache / f"{name}-{tokens}.pt" if cache else None
    if path is not None and path.exists():
        d = torch.load(path)
        return Features(d["h"], d["y"], d["lse"], d["offsets"])
    f = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples],
                         ForwardConfig(tokens=tokens), head, progress=True, desc=name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"h": f.h, "y": f.y, "lse": f.lse, "offsets": f.offsets}, path)
    return f


def open_or_build_index(lm, index_dir: str | None, train, build_dir: str):
    """(its directory, the opened Index): `index_dir` as given, or when None a default-config index of `train`
    built into `build_dir`."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.index import Index

    if index_dir is None:
        index_dir = build_dir
        build_index(index_dir, train, lm, BuildConfig())
    return index_dir, Index.open(index_dir, lm)


def cached_exact(fv: Features, ft: Features, head, cache: Path | None, name: str) -> torch.Tensor:
    """Exact full-vocabulary scores, cached like the features."""
    path = cache / f"{name}-exact.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path)
    S = exact_scores(fv, ft, head)
    if path is not None:
        torch.save(S, path)
    return S
