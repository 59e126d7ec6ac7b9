"""kill -9 of the index builder at 20 seeded points (FORVALUE_FAULT, store.py), the CURRENT switch included.

After every kill: every published version is complete and verifies, CURRENT names one of them (or is
absent when none was made current), and a server started on the index before the crashes answers. A
rerun then completes, leaves no `.tmp-*` entry anywhere and publishes what a clean build publishes.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np

from forvalue.indexer.files import FAULT_POINTS
from forvalue.indexer.store import IndexRoot
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import pb, pb_grpc

from buildproc import Builder
from serving import ServerThread, corpus

SEED = 5
N_KILLS = 20
# what the killed builder was doing: a new index (maps fitted, 3 shards), or `index add` onto v000001
# (its 3 shards linked, 2 new ones)
JOBS = {"build": {"op": "build", "n": 24, "seed": 5, "prefix": "b"},
        "add": {"op": "add", "n": 16, "seed": 6, "prefix": "c", "base": "v000001"}}
QUERIES = [(s.prompt, s.response) for s in corpus(6, seed=12, prefix="q")]


def topk_request(q: int) -> pb.TopKRequest:
    prompt, response = QUERIES[q % len(QUERIES)]
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt=prompt, response=response)], k=5, direction=pb.MOST,
                          rerank=12, group=True)


class Load:
    """One client sending TopK calls back to back until stopped; keeps (version or error) per call."""

    def __init__(self, address: str):
        self.results: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self._thread.start()

    def _run(self, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            q = 0
            while not self._stop.is_set():
                try:
                    self.results.append(stub.TopK(topk_request(q), timeout=60).index_version)
                except grpc.RpcError as exc:
                    self.results.append(exc)
                q += 1

    def stop(self) -> list[object]:
        self._stop.set()
        self._thread.join(120)
        return self.results


def snapshot(root: Path, version: str) -> tuple[list[str], np.ndarray, list[int]]:
    """(ids in row order, the sketch array, rows per shard) of a version, loaded with verification."""
    with IndexRoot(root).load(version, verify=True) as v:
        return [r["id"] for r in v.rows(np.arange(v.n))], np.array(v.array("sketch")), v.shard_rows.tolist()


def assert_same_build(got, ref, what: str) -> None:
    assert got[0] == ref[0] and len(set(got[0])) == len(got[0]), f"{what}: ids differ from a clean build"
    assert got[2] == ref[2], f"{what}: shard sizes differ from a clean build"
    # the forward passes of a resumed build batch the samples differently from a clean one: ulp-level
    # differences, not bitwise
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6, err_msg=f"{what}: sketch arrays differ")


def from_base(job: str, root: Path) -> None:
    """An add onto v000001 publishes only while v000001 is CURRENT (publishing is a compare-and-swap of CURRENT,
    so an add never hides what another update published): roll CURRENT back to it first, as an operator would."""
    if JOBS[job].get("base") and IndexRoot(root).current() != JOBS[job]["base"]:
        IndexRoot(root).set_current(JOBS[job]["base"])


def leftovers(root: Path) -> list[str]:
    """Every crash leftover under `root`: .tmp-* / CURRENT.tmp-* / .trash-* entries, unpublished builds."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if ".tmp-" in n or ".trash-" in n]
    builds = root / "builds"
    return found + ([str(p) for p in builds.iterdir()] if builds.is_dir() else [])


def plan(traces: dict[str, list[str]], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """N_KILLS (job, point, n): one at every point some job reaches, the rest drawn from all arrivals."""
    arrivals = [(job, point, trace[: i + 1].count(point)) for job, trace in traces.items()
                for i, point in enumerate(trace)]
    chosen = []
    for point in sorted({p for _, p, _ in arrivals}):
        options = [a for a in arrivals if a[1] == point]
        chosen.append(options[rng.integers(len(options))])
    rest = [a for a in arrivals if a not in chosen]
    chosen += [rest[i] for i in rng.choice(len(rest), N_KILLS - len(chosen), replace=False)]
    rng.shuffle(chosen)
    return chosen


def check_after_kill(root: Path, since: set[str], served: bool) -> None:
    """What a kill may leave: complete versions only, CURRENT naming one of them or absent."""
    idx = IndexRoot(root)
    for name in sorted(set(idx.versions()) - since):
        idx.load(name, verify=True).close()  # a version directory is never half there
    current = idx.current()
    if current is None:
        assert not served and not (root / "CURRENT").exists()
    else:
        idx.load(current, verify=True).close()


def check_server(srv: ServerThread, root: Path) -> int:
    """Reload, then TopK and ScoreAll answer OK from CURRENT; returns the calls made."""
    current = IndexRoot(root).current()
    assert srv.run(srv.server.reload()) == current
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InfluenceStub(channel)
        assert stub.TopK(topk_request(0), timeout=60).index_version == current
        chunks = list(stub.ScoreAll(pb.ScoreAllRequest(samples=topk_request(1).samples), timeout=60))
    with IndexRoot(root).load(current, verify=False) as v:
        assert {c.index_version for c in chunks} == {current}
        assert [i for c in chunks for i in c.ids] == [r["id"] for r in v.rows(np.arange(v.n))]
    return 2


def test_kill_9_at_20_points_then_rerun_equals_clean(tmp_path, served_index, served_model_dir):
    rng = np.random.default_rng(SEED)
    root = tmp_path / "served"
    shutil.copytree(served_index[0], root)  # v000001: the version the server starts on
    faults = calls = 0
    with Builder(served_model_dir) as builder:
        refs, traces = {}, {}
        for job, spec in JOBS.items():  # clean builds: the reference, and the fault points they reach
            clean = tmp_path / f"clean-{job}"
            shutil.copytree(served_index[0], clean)
            r = builder.run(**spec, root=clean, trace=True)
            assert r["rc"] == 0, r["error"]
            refs[job], traces[job] = snapshot(clean, r["version"]), r["trace"]
        assert {p for t in traces.values() for p in t} == set(FAULT_POINTS) - {"gc-trash"}
        kills = plan(traces, rng)

        srv = ServerThread(ServerConfig(index_dir=str(root), model_path=served_model_dir, k_cap=20, watch_seconds=0))
        load = None
        try:
            srv.wait_ready()
            load = Load(srv.address)
            for i, (job, point, n) in enumerate(kills):
                fresh = job == "build" and i % 3 == 0  # a new directory: nothing published there yet
                target = tmp_path / f"fresh-{i}" if fresh else root
                since = set(IndexRoot(target).versions())
                from_base(job, target)
                r = builder.run(**JOBS[job], root=target, fault=f"{point}:{n}")
                assert r["rc"] == -9, f"kill {i} ({job} at {point}:{n}) did not happen: {r}"
                faults += 1
                check_after_kill(target, since, served=not fresh)
                calls += check_server(srv, root)
                if i % 2 and any((target / "builds").iterdir()):
                    # the resumed build killed in turn, during its CURRENT switch
                    from_base(job, target)
                    r = builder.run(**JOBS[job], root=target, fault="current-tmp:1")
                    assert r["rc"] == -9, r
                    faults += 1
                    check_after_kill(target, since, served=not fresh)
                    calls += check_server(srv, root)
                from_base(job, target)
                r = builder.run(**JOBS[job], root=target)
                assert r["rc"] == 0, r["error"]
                assert not leftovers(target), f"kill {i} ({point}:{n}): {leftovers(target)}"
                assert IndexRoot(target).current() == r["version"]
                for name in sorted(set(IndexRoot(target).versions()) - since):
                    assert_same_build(snapshot(target, name), refs[job], f"kill {i} ({job} at {point}:{n}): {name}")
                calls += check_server(srv, root)

            # and a kill during gc: the half-deleted version is out of sight, the next gc finishes the job
            r = builder.run("gc", root, fault="gc-trash:1", keep=1)
            assert r["rc"] == -9, r
            faults += 1
            check_after_kill(root, set(), served=True)
            calls += check_server(srv, root)
            assert any(".trash-" in p for p in leftovers(root))
            r = builder.run("gc", root, keep=1)
            assert r["rc"] == 0 and not leftovers(root), r
            assert IndexRoot(root).versions() == [IndexRoot(root).current()]
            calls += check_server(srv, root)
            results = load.stop()
        finally:
            if load is not None:
                load.stop()
            srv.stop()
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert not errors, errors[:3]
    print(f"faults injected: {faults}, queries: {calls} between kills + {len(results)} under load, failures: 0")
    assert faults >= N_KILLS + 1 and len(results) > 0
