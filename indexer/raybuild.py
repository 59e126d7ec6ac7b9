"""Index builds on Ray Data: the forward passes and sketches of the shards run as `map_batches` actors.

`build_index_ray` is `build.build_index` with the shard loop handed to a Ray cluster:

1. The driver (this process) loads the model, fits the shared vocabulary map and projections from a
   seeded sample of the corpus and saves them in the build, exactly as a single-process build does (the
   build key is the same, so either kind of build resumes the other's shards).
2. One dataset row per shard still to do (its index and its samples), `map_batches` over an actor pool:
   each actor loads the model (from `model_path`) and the saved maps once, then encodes whole shards and
   writes each into the build directory itself (`store.ShardWriter`: atomic, checksummed, keyed by the
   shard's place in the corpus, whose ids and texts key the build). One actor per GPU (`num_gpus=1`), or
   CPU actors (`num_cpus` each).
3. When the dataset is consumed, the driver re-reads the finished shards, writes any shard still
   missing itself (never a hole), builds the first stage and publishes the version.

Failures: Ray Data's actor pool restarts an actor whose worker died and retries its tasks (its defaults,
max_restarts = max_task_retries = -1); a shard written twice (a retry racing its first attempt) has the
same content. A killed driver loses nothing
finished: rerunning the same build resumes from the shards on disk.

The index directory must be on a file system that every Ray node sees (NFS, a shared volume), and every
node needs forvalue, the model (`model_path`) and the same package versions. Ray is optional:
`pip install 'forvalue[ray]'`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

from .build import build_index, encode_shard
from .sketch import MAP_FILES, Sketcher
from .config import BuildConfig
from .data import Sample
from .errors import ConfigError
from .model import LoadedModel

log = logging.getLogger("forvalue.indexer.raybuild")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("distributed builds need Ray Data: pip install 'forvalue[ray]' (ray[data])") from exc
    return ray


def ray_available() -> bool:
    """Whether `import ray.data` works."""
    try:
        _import_ray()
    except ImportError:
        return False
    return True


def _sample_to_json(s: Sample) -> dict:
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(Sample)}


def _config_to_json(config: BuildConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _config_from_json(text: str) -> BuildConfig:
    from .config import FirstStageConfig, SketchConfig

    d = json.loads(text)
    return BuildConfig(**{**d, "sketch": SketchConfig(**d["sketch"]),
                          "first_stage": FirstStageConfig(**d["first_stage"])})


class ShardEncoder:
    """The Ray Data actor: model and maps loaded once, then `__call__` encodes and writes whole shards.

    Args:
        build_dir: the open build's directory (the driver holds it open).
        model_path: what `load_model` loads on the worker (None: the default model).
        config: BuildConfig as JSON (`_config_to_json`).
        device: torch device of the worker's forward passes ("cuda" on GPU actors).
        dtype: precision of the worker's forward passes: the driver's, so that every shard of a build is
            computed alike (model.load_model).
        norms: also store ‖G‖ per sample (see build.encode_shard).
        threads: torch threads per actor (None: torch's default).
    """

    def __init__(self, build_dir: str, model_path: str | None, config: str, device: str = "cpu",
                 norms: bool = True, threads: int | None = None, dtype: str = "float32"):
        import numpy as np
        import torch

        from .features import Head
        from .model import load_model
        from .store import ShardWriter

        if threads is not None:
            torch.set_num_threads(threads)
        self.config = _config_from_json(config)
        self.lm = load_model(model_path, device=device, dtype=dtype)
        self.head = Head.from_model(self.lm.model).to(next(self.lm.model.parameters()).device)
        self.writer = ShardWriter(build_dir)
        arrays = {n: np.load(self.writer.path / n, allow_pickle=False) for n in MAP_FILES}
        self.sketcher = Sketcher.from_arrays(arrays, self.config.sketch.buckets)
        self.norms = norms

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        done, rows = [], []
        for shard, text in zip(batch["shard"], batch["samples"]):
            samples = [Sample(**d) for d in json.loads(str(text))]
            arrays, tokens, offsets, meta = encode_shard(self.lm, self.head, self.sketcher, samples, self.config,
                                                         norms=self.norms)
            self.writer.write_shard(int(shard), arrays, meta, token_arrays=tokens, offsets=offsets)
            done.append(int(shard))
            rows.append(len(samples))
        return {"shard": done, "rows": rows}


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how the shards are encoded.

    Attributes:
        address: the Ray cluster ("auto": the one this machine belongs to; "local" or None: start one here;
            else an address such as "ray://head:10001" or "10.0.0.1:6379").
        model_path: what each worker loads (None: the default model); must name the model the driver has.
        workers: actors in the pool (None: one per GPU with use_gpu, else one per CPU of the cluster).
        use_gpu: one GPU per actor, forward passes on "cuda".
        cpus_per_worker: CPUs per CPU actor (also its torch threads).
    """

    address: str | None = "auto"
    model_path: str | None = None
    workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (or None: one per CPU or GPU), got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")


class RayShards:
    """The `write_shards` hook of `build_index` that runs the shards through Ray Data (see the module docstring)."""

    def __init__(self, config: BuildConfig, options: RayOptions, dtype: str = "float32"):
        self.config = config
        self.options = options
        self.dtype = dtype
        self.written: list[int] = []  # shards the actors reported done (read by tests and the CLI)

    def __call__(self, build, todo: list[tuple[int, Sequence[Sample]]], norms: bool) -> None:
        if not todo:
            return
        ray = _import_ray()
        o = self.options
        if not ray.is_initialized():
            try:
                ray.init(address=None if o.address in (None, "local") else o.address, log_to_driver=False,
                         include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster {o.address!r} ({exc}); start one (ray start --head), "
                                  "give its address, or use --ray local for one on this machine") from exc
        resources = ray.cluster_resources()
        if o.use_gpu:
            workers = o.workers or max(1, int(resources.get("GPU", 0)))
            remote = {"num_gpus": 1, "num_cpus": 1}
        else:
            workers = o.workers or max(1, int(resources.get("CPU", 1)) // o.cpus_per_worker)
            remote = {"num_cpus": o.cpus_per_worker}
        workers = min(workers, len(todo))
        items = [{"shard": i, "samples": json.dumps([_sample_to_json(s) for s in chunk])} for i, chunk in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(
            ShardEncoder, batch_size=1,
            fn_constructor_kwargs={"build_dir": str(build.path), "model_path": o.model_path,
                                   "config": _config_to_json(self.config), "device": "cuda" if o.use_gpu else "cpu",
                                   "norms": norms, "threads": o.cpus_per_worker, "dtype": self.dtype},
            # at least one actor; more as the cluster has room (a lost node shrinks the pool, not the build)
            concurrency=(1, workers), **remote)
        for row in out.iter_rows():
            self.written.append(int(row["shard"]))
        log.info("Ray wrote %d shards with up to %d actors", len(self.written), workers)


def build_index_ray(root: str, samples: Sequence[Sample], lm: LoadedModel, config: BuildConfig = BuildConfig(),
                    options: RayOptions = RayOptions(), progress: bool = False) -> str:
    """`build.build_index` with the shards encoded on a Ray cluster; returns the published version's name.

    Args:
        lm: the model, loaded in the driver (fits the maps, fingerprints the build); the workers load
            `options.model_path`, which must be the same model (the shards are checked against the
            driver's fingerprint when the index is opened).
    """
    shards = RayShards(config, options, dtype=lm.dtype_name)
    return build_index(root, samples, lm, config, progress=progress, write_shards=shards)
