"""Index builds on Ray Data: a local cluster with two worker nodes against the single-process build."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.raybuild import RayOptions, RayShards, build_index_ray  # noqa: E402
from forvalue.indexer.store import IndexRoot  # noqa: E402

from serving import corpus  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster of three nodes takes tens of seconds to start on two cores

CONFIG = BuildConfig(sketch=SketchConfig(rank=4, buckets=32, fit_samples=20), shard_size=4)


@pytest.fixture(scope="module")
def cluster():
    """A head node with no CPUs (it schedules nothing) and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    # a removed node is noticed within about a second (the defaults take tens of seconds)
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 3}
    for attempt in range(3):
        # a raylet that takes more than Ray's fixed 30 s to register (a loaded 2-core machine) fails the start:
        # start the whole cluster again rather than fail the build tests on start-up time
        c = Cluster(initialize_head=False)
        try:
            c.add_node(num_cpus=0, _system_config=fast)  # the head
            workers = [c.add_node(num_cpus=1) for _ in range(2)]
            c.wait_for_nodes()
            break
        except Exception:
            c.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory, served_lm):
    """The single-process build of the same corpus: the reference."""
    root = tmp_path_factory.mktemp("single")
    samples = corpus(30)
    build_index(str(root), samples, served_lm, CONFIG)
    return IndexRoot(root).load(), samples


def assert_same_index(got, want) -> None:
    """Same rows (ids, metadata) in the same order, same arrays to float tolerance, same maps."""
    assert got.n == want.n and got.manifest["shard_sizes"] == want.manifest["shard_sizes"]
    # a build from a file also keeps each row as read ("raw"); the reference's samples were made in memory
    def rows(v):
        return [{k: x for k, x in r.items() if k != "raw"} for r in v.rows(np.arange(v.n))]

    assert rows(got) == rows(want)
    ids = [r["id"] for r in got.rows(np.arange(got.n))]
    assert len(set(ids)) == len(ids)
    for name in ("sketch", "g_norm"):
        np.testing.assert_allclose(got.array(name), want.array(name), rtol=1e-4, atol=1e-5)
    for name in ("h", "lse", "y"):
        np.testing.assert_allclose(got.array(name), want.array(name), rtol=1e-5, atol=1e-5)
    for name in ("projection.npy", "vocab_bucket.npy", "vocab_sign.npy"):
        np.testing.assert_array_equal(got.global_array(name), want.global_array(name))


def test_ray_build_equals_the_single_process_build(cluster, single, tmp_path, served_lm, served_model_dir):
    c, _ = cluster
    want, samples = single
    hook = RayShards(CONFIG, RayOptions(address=c.address, model_path=served_model_dir))
    name = build_index(str(tmp_path), samples, served_lm, CONFIG, write_shards=hook)
    assert sorted(hook.written) == list(range(8))  # every shard came from a Ray actor, none from the driver
    assert_same_index(IndexRoot(tmp_path).load(name), want)


def test_killing_a_worker_mid_build_still_yields_the_whole_index(cluster, single, tmp_path, served_lm,
                                                                 served_model_dir):
    c, _ = cluster
    want, samples = single
    doomed = c.add_node(num_cpus=1)  # a third worker, removed once the build is under way
    c.wait_for_nodes()
    killed = threading.Event()

    def kill_when_started():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            builds = list((tmp_path / "builds").glob("*/shards"))
            if builds and any(p.name.isdigit() for p in builds[0].iterdir()):
                c.remove_node(doomed)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    name = build_index_ray(str(tmp_path), samples, served_lm, CONFIG,
                           RayOptions(address=c.address, model_path=served_model_dir, workers=3))
    killer.join(10)
    assert killed.is_set(), "the worker was never removed: the test did not test a failure"
    assert_same_index(IndexRoot(tmp_path).load(name), want)


def test_a_rerun_resumes_from_finished_shards(cluster, single, tmp_path, served_lm, served_model_dir, monkeypatch):
    """Shards already on disk are not given to Ray again; the published version is the same."""
    c, _ = cluster
    want, samples = single
    with pytest.raises(RuntimeError, match="stop after the maps"):
        def stop(build, todo, norms):
            i, arrays, rows, tokens, offsets = _encode_first(build, todo, served_lm, norms)
            build.write_shard(i, arrays, rows, token_arrays=tokens, offsets=offsets)
            raise RuntimeError("stop after the maps and one shard")

        build_index(str(tmp_path), samples, served_lm, CONFIG, write_shards=stop)
    hook = RayShards(CONFIG, RayOptions(address=c.address, model_path=served_model_dir))
    name = build_index(str(tmp_path), samples, served_lm, CONFIG, write_shards=hook)
    assert sorted(hook.written) == list(range(1, 8))
    assert_same_index(IndexRoot(tmp_path).load(name), want)


def _encode_first(build, todo, lm, norms):
    """(shard index, arrays, rows, token_arrays=..., offsets=...) of the first shard of `todo`, in-process."""
    from forvalue.indexer.build import encode_shard
    from forvalue.indexer.sketch import MAP_FILES, Sketcher
    from forvalue.indexer.features import Head

    sk = Sketcher.from_arrays({n: build.read_array(n) for n in MAP_FILES}, CONFIG.sketch.buckets)
    i, chunk = todo[0]
    arrays, tokens, offsets, rows = encode_shard(lm, Head.from_model(lm.model), sk, chunk, CONFIG, norms=norms)
    return i, arrays, rows, tokens, offsets


def test_ray_options_checks():
    from forvalue.indexer.errors import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        RayOptions(workers=0)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        RayOptions(cpus_per_worker=0)


def test_cli_index_build_ray(cluster, single, tmp_path, served_model_dir):
    """forvalue index build --ray ADDRESS: the same index as the single-process build."""
    from click.testing import CliRunner

    from forvalue.client.cli import main
    from forvalue.indexer.data import write_jsonl

    c, _ = cluster
    want, samples = single
    data = tmp_path / "train.jsonl"
    write_jsonl(data, samples)
    result = CliRunner().invoke(main, ["index", "build", "--data", str(data), "--out", str(tmp_path / "idx"),
                                       "--model", served_model_dir, "--dim", "128", "--rank", "4", "--fit-samples",
                                       "20", "--shard-size", "4", "--no-progress", "--ray", c.address])
    assert result.exit_code == 0, result.output
    assert_same_index(IndexRoot(tmp_path / "idx").load(), want)
