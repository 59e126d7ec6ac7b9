"""Storage tiers of the re-rank data (`BuildConfig.rerank_dtype`, `--rerank-store`): the "recompute" tier (no hidden
states stored; candidates encoded again at query time) gives the stored tier's answers, survives add, delete and
sync, and the float16 tier's scores stay within a bound of float32's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from forvalue.indexer.build import build_index, storage_summary
from forvalue.indexer.config import BuildConfig
from forvalue.indexer.deletion import delete_samples
from forvalue.indexer.errors import ConfigError, IndexCorruptError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.score import exact_scores
from forvalue.indexer.sketch import MAP_FILES, Sketcher
from forvalue.indexer.store import IndexRoot
from forvalue.indexer.sync import sync_index

from indexes import CFG, brute_topk, plain_corpus

RECOMPUTE = dataclasses.replace(CFG, rerank_dtype="recompute")


def maps_of(root) -> Sketcher:
    with IndexRoot(str(root)).load() as v:
        return Sketcher.from_arrays({n: np.array(v.global_array(n)) for n in MAP_FILES}, v.manifest["sketch"]["buckets"])


@pytest.fixture(scope="module")
def recomputed(built60, lm, tmp_path_factory):
    """(stored-tier Index, recompute-tier Index) over the same 60 rows with the same sketch maps."""
    root, samples, _ = built60
    other = tmp_path_factory.mktemp("recompute")
    build_index(str(other), samples, lm, RECOMPUTE, maps=maps_of(root))
    return Index.open(str(root), lm), Index.open(str(other), lm)


def queries(n=3, seed=9):
    return [dataclasses.replace(s, id=f"q{i}") for i, s in enumerate(plain_corpus(n, seed=seed))]


def test_recompute_tier_stores_no_hidden_states(recomputed):
    stored, recompute = recomputed
    m = recompute.manifest
    assert m["rerank_dtype"] == "recompute" and m["rerank_top"] == 0
    assert not {"h", "lse", "top_ids", "top_p", "tail_l2"} & set(recompute.version.arrays)
    assert {"y", "sketch", "g_norm"} <= set(recompute.version.arrays)
    # what is left per token: the target id; the sketch is the same as the stored tier's
    np.testing.assert_array_equal(recompute.version.array("y"), stored.version.array("y"))
    np.testing.assert_allclose(recompute.version.array("sketch"), stored.version.array("sketch"), rtol=1e-5,
                               atol=1e-5)
    assert (storage_summary(m)["rerank_bytes_per_sample"] * 20
            < storage_summary(stored.manifest)["rerank_bytes_per_sample"])


@pytest.mark.parametrize("direction", ["most", "least"])
def test_recompute_tier_gives_the_stored_tiers_answers(recomputed, direction):
    stored, recompute = recomputed
    for group in (queries(1), queries(3)):
        a = stored.search(group, k=5, direction=direction, rerank=20, explain=3)
        b = recompute.search(group, k=5, direction=direction, rerank=20, explain=3)
        assert [h.row for h in a.hits] == [h.row for h in b.hits]
        sa, sb = np.array([h.score for h in a.hits]), np.array([h.score for h in b.hits])
        np.testing.assert_allclose(sb, sa, rtol=1e-4, atol=1e-4 * np.abs(sa).max())
        for ha, hb in zip(a.hits, b.hits):
            assert hb.cosine == pytest.approx(ha.cosine, rel=1e-4, abs=1e-6)
            assert hb.percentile is None  # no percentiles without stored states (a pass per calibration row)
            assert hb.explanation.total == pytest.approx(ha.explanation.total, rel=1e-4, abs=1e-4 * abs(sa).max())
            assert ({(p.query_position, p.train_position) for p in hb.explanation.top_pairs}
                    == {(p.query_position, p.train_position) for p in ha.explanation.top_pairs})
    # every row scored: the same exact values
    va, vb = stored.score_all(queries(2))[1], recompute.score_all(queries(2))[1]
    np.testing.assert_allclose(vb, va, rtol=1e-4, atol=1e-4 * np.abs(va).max())


def test_recompute_refuses_rows_whose_tokens_changed(recomputed, monkeypatch):
    _, recompute = recomputed
    real = recompute.version.rows
    monkeypatch.setattr(recompute.version, "rows",
                        lambda rows: [{**r, "response": r["response"] + " and more words"} for r in real(rows)])
    with pytest.raises(IndexCorruptError, match="scores other tokens than the build stored"):
        recompute.candidate_features([3, 4])


def _check_exact(root, lm, live):
    """The recompute-tier index at `root` answers as exact For-Value over the `live` samples does."""
    idx = Index.open(str(root), lm)
    assert idx.manifest["rerank_dtype"] == "recompute" and "h" not in idx.version.arrays
    ids = idx.ids()
    q = queries(2, seed=4)
    cfg = ForwardConfig(tokens="response")
    head = Head.from_model(lm.model)
    fq = extract_features(lm.model, lm.tokenizer, [s.as_input() for s in q], cfg, head)
    ft = extract_features(lm.model, lm.tokenizer, [s.as_input() for s in live], cfg, head)
    S = exact_scores(fq, ft, head).double().mean(0).numpy()
    for direction in ("most", "least"):
        r = idx.search(q, k=4, direction=direction, rerank=idx.n)
        want = [live[i].id for i in brute_topk(S, range(len(live)), 4, direction)]
        assert [ids[h.row] for h in r.hits] == want
        by_id = {s.id: S[i] for i, s in enumerate(live)}
        np.testing.assert_allclose([h.score for h in r.hits], [by_id[i] for i in want], rtol=1e-4,
                                   atol=1e-4 * np.abs(S).max())
    return idx


def test_recompute_tier_survives_add_delete_and_sync(tmp_path, lm):
    root = tmp_path / "idx"
    first, more = plain_corpus(30), [dataclasses.replace(s, id=f"m{i}") for i, s in enumerate(plain_corpus(8, seed=3))]
    build_index(str(root), first, lm, RECOMPUTE)
    _check_exact(root, lm, first)
    base = IndexRoot(str(root)).load()
    build_index(str(root), more, lm, RECOMPUTE, base=base)  # index add
    _check_exact(root, lm, first + more)
    delete_samples(str(root), ["s3", "m1"])
    live = [s for s in first + more if s.id not in ("s3", "m1")]
    _check_exact(root, lm, live)
    # sync: rows removed, one edited, new ones; taken-down rows stay out
    new = [s for s in first + more if s.id not in ("s5", "s6")]
    new = [dataclasses.replace(s, response=s.response + " again") if s.id == "s10" else s for s in new]
    new += [dataclasses.replace(s, id=f"n{i}") for i, s in enumerate(plain_corpus(3, seed=7))]
    r = sync_index(str(root), new, lm, batch_tokens=4096)
    assert r.published and r.encoded == 1 + 3
    idx = _check_exact(root, lm, [s for s in new if s.id not in ("s3", "m1")])
    assert idx.manifest["sync"]["recall"] is not None  # measured by encoding the rows again


def test_add_keeps_the_tier(tmp_path, lm):
    root = tmp_path / "idx"
    build_index(str(root), plain_corpus(10), lm, RECOMPUTE)
    more = [dataclasses.replace(s, id=f"m{i}") for i, s in enumerate(plain_corpus(2, seed=3))]
    with pytest.raises(Exception, match="rerank_dtype is recompute"):
        build_index(str(root), more, lm, CFG, base=IndexRoot(str(root)).load())


def test_fp16_tier_score_difference_is_bounded(built60, lm, tmp_path):
    root, samples, _ = built60
    half = tmp_path / "half"
    build_index(str(half), samples, lm, dataclasses.replace(CFG, rerank_dtype="float16"), maps=maps_of(root))
    a, b = Index.open(str(root), lm), Index.open(str(half), lm)
    assert b.version.arrays["h"]["dtype"] == "<f2"
    q = queries(3)
    fq = a.encode(q)
    s32 = a.score_matrix(fq).double()
    s16 = b.score_matrix(fq).double()
    diff = (s16 - s32).abs()
    # float16 keeps 11 significant bits of each h: a relative error of 2^-11 per element, so <h, h'> moves by
    # about 2^-10 of Σ|h||h'| and α (|α| <= 3) by about as much through the probabilities; the bound below is
    # that per pair: 3 · 2 · 2^-10 · Σ_kk' |h_k|·|h_k'| (Cauchy–Schwarz), summed as the score is
    fv, ft = fq, a.candidate_features(np.arange(a.n))
    nv, nt = fv.h.double().norm(dim=1), ft.h.double().norm(dim=1)
    from forvalue.indexer.score import segment_sum_rows

    mag = segment_sum_rows(segment_sum_rows(nv[:, None] * nt[None, :], fv.segment, fv.n).T, ft.segment, ft.n).T
    assert (diff <= 6 * 2.0**-10 * mag).all()
    assert diff.max() > 0  # the tier stores half precision indeed
    assert float(diff.max() / s32.abs().max()) < 1e-2


def test_tier_option_names(tmp_path):
    assert BuildConfig(rerank_dtype="recompute").stores_states is False
    assert BuildConfig(rerank_dtype="float16").stores_states
    with pytest.raises(ConfigError, match="--rerank-store"):
        BuildConfig(rerank_dtype="int8")


@pytest.mark.parametrize("option", ["--rerank-store", "--rerank-dtype"])
def test_cli_takes_the_tier_under_both_names(tmp_path, served_model_dir, option):
    from click.testing import CliRunner

    from forvalue.client.cli import main
    from forvalue.indexer.data import write_jsonl

    data = tmp_path / "c.jsonl"
    write_jsonl(data, plain_corpus(6))
    root = str(tmp_path / "idx")
    r = CliRunner().invoke(main, ["index", "build", "--data", str(data), "--index", root, "--model", served_model_dir,
                                  "--no-progress", "--dim", "64", "--rank", "2", option, "recompute"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "re-rank store recompute" in r.output
    with IndexRoot(root).load() as v:
        assert v.manifest["rerank_dtype"] == "recompute" and "h" not in v.arrays
