"""A build process for the crash tests, killed with SIGKILL at chosen points (FORVALUE_FAULT, see store.py).

`Builder` starts `python buildproc.py MODEL_DIR` once: it imports torch and loads the tiny model, then
forks one child per request, which runs `build_index` (or `gc`) and dies wherever FORVALUE_FAULT says. A
fresh interpreter per build would spend seconds on imports; a fork costs milliseconds. The test process
itself never forks (it runs a gRPC server).

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
    request: {"op": "build" | "add" | "gc", "root": DIR, "n", "seed", "prefix": corpus(n, seed, prefix),
              "base": version to add to (op "add"), "keep": (op "gc"), "fault": "<point>:<n>" or null,
              "trace": record the fault points reached}
    reply:   {"rc": exit status, -9 when killed by SIGKILL, "version": what was published,
              "removed": what gc removed, "trace": [points reached, in order], "error": traceback or null}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

SHARD_SIZE = 8


class Builder:
    """The client side: start the build process, send requests, read replies (no heavy imports here)."""

    def __init__(self, model_dir: str):
        env = {k: v for k, v in os.environ.items() if k != "FORVALUE_FAULT"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), model_dir], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = self.proc.stdout.readline()
        if json.loads(ready or "null") != {"ready": True}:
            raise RuntimeError(f"the build process did not start: {ready!r}")

    def run(self, op: str, root, fault: str | None = None, trace: bool = False, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "root": str(root), "fault": fault, "trace": trace, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the build process exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)

    def __enter__(self) -> Builder:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()


def _config(n: int):
    from forvalue.indexer.config import BuildConfig, SketchConfig

    return BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=n), shard_size=SHARD_SIZE)


def _add_config(manifest: dict):
    """The config `forvalue index add` derives from the base version (client/cli.py)."""
    from forvalue.indexer.config import BuildConfig, SketchConfig

    sk = manifest["sketch"]
    return BuildConfig(tokens=manifest["tokens"], max_length=manifest["max_length"],
                       rerank_dtype=manifest["rerank_dtype"], rerank_top=int(manifest.get("rerank_top", 0)),
                       shard_size=SHARD_SIZE,
                       sketch=SketchConfig(rank=sk["rank"], buckets=sk["buckets"], dedicated=sk["dedicated"],
                                           seed=sk["seed"], fit_samples=sk["fit_samples"]))


def _child(req: dict, lm) -> dict:
    from forvalue.indexer import files, store
    from forvalue.indexer.build import build_index

    from serving import corpus

    if req["fault"]:
        os.environ[files.FAULT_ENV] = req["fault"]
    trace: list[str] = []
    if req["trace"]:
        files.fault_observer = trace.append
    reply: dict = {"trace": trace}
    root = store.IndexRoot(req["root"])
    if req["op"] == "gc":
        reply["removed"] = root.gc(req["keep"])
        return reply
    samples = corpus(req["n"], req["seed"], req["prefix"])
    if req["op"] == "add":
        base = root.load(req["base"], verify=True)
        reply["version"] = build_index(req["root"], samples, lm, _add_config(base.manifest), base=base)
    else:
        reply["version"] = build_index(req["root"], samples, lm, _config(req["n"]))
    return reply


def main(model_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: serving.py
    import torch

    torch.set_num_threads(1)  # no thread pool is started before fork, none is inherited half-used
    from forvalue.indexer.model import load_model

    lm = load_model(model_dir)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: build, write the reply, exit without running any cleanup
            os.close(r)
            status, reply = 1, {}
            try:
                reply = _child(req, lm)
                status = 0
            except BaseException:
                reply = {"error": traceback.format_exc()}
            finally:
                with os.fdopen(w, "w") as f:
                    f.write(json.dumps(reply))
                os._exit(status)
        os.close(w)
        with os.fdopen(r) as f:
            raw = f.read()  # until the child exits (or is killed): EOF
        _, status = os.waitpid(pid, 0)
        reply = {"version": None, "removed": None, "trace": None, "error": None, **json.loads(raw or "{}")}
        reply["rc"] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
