"""forvalue side by side with the authors' published For-Value code on a DataInf task (issue 8).

Runs, back to back in one session and as separate processes under the same thread settings:
`forvalue eval --method inbatch` (the official code's in-batch vocabulary), the official
`forvalue_streaming.py` from an outside checkout (--official DIR; none of its code is in this
repository), `forvalue eval --method exact`, and the in-batch run again. Each time is the wall clock
of the whole process: start, imports, model and data loading, forward passes, scores. The official
run's score matrix (saved with the small `--scores_path` adaptation, see docs/results.md) is scored
with forvalue's own metric code (forvalue.indexer.metrics), so both AUC/Recall pairs come from the
same function.

The DataInf reader of forvalue drops the literal `</s>` at the end of DataInf's `text` (Llama-2's EOS
spelled as text) and appends the model's own EOS; the official code scores `text` as it is. With
--same-text forvalue gets prompt + (text minus prompt) from a JSONL written under --out, i.e. exactly the
official code's token sequences (its padding target is the same EOS id for SmolLM2).

Prints one JSON object on stdout; progress and each step's JSON go to stderr, logs under --out.

    OMP_NUM_THREADS=2 python tools/compare_official.py --official /work/official/run \
        --official-pythonpath /work/official/pylib --datainf ../shared/eval/datainf --out /tmp/cmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def default_model_dir() -> Path:
    """The converted HF directory forvalue itself loads (the default GGUF's cache entry)."""
    from forvalue.indexer.model import cached_gguf_checkpoint, default_cache_dir, default_model_path

    return cached_gguf_checkpoint(default_model_path(), default_cache_dir())


def timed(cmd: list[str], log: Path, env: dict, cwd: Path | None = None) -> tuple[float, str]:
    """Runs `cmd` to completion → (wall seconds, stdout); stderr goes to `log`, a failure raises."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - t0
    with open(log, "a") as err:
        err.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} {' '.join(cmd[1:3])} ... exited with {proc.returncode}; see {log}")
    return seconds, proc.stdout


def write_same_text(data_dir: Path, task: str, out: Path) -> Path:
    """The task's rows as JSONL with response = text minus prompt, `</s>` kept (the official code's input)."""
    import pyarrow as pa

    path = out / f"{task}_text.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for split in ("train", "test"):
            arrow = data_dir / f"{task}_{split}.hf" / "data-00000-of-00001.arrow"
            with open(arrow, "rb") as src:
                rows = pa.ipc.open_stream(src).read_all().to_pylist()
            for i, r in enumerate(rows):
                if not r["text"].startswith(r["prompt"]):
                    raise SystemExit(f"{arrow} row {i}: text does not start with prompt")
                row = {"id": f"{split}/{i}", "prompt": r["prompt"], "response": r["text"][len(r["prompt"]):],
                       "label": r["variation"], "split": split}
                f.write(json.dumps(row) + "\n")
    return path


def run_forvalue(data: Path, model: Path, method: str, env: dict, out: Path, tag: str, dtype: str = "auto") -> dict:
    exe = Path(sys.executable).parent / "forvalue"
    cmd = [str(exe), "eval", str(data), "--model", str(model), "--tokens", "all", "--method", method,
           "--dtype", dtype, "--json", "--no-progress"]
    seconds, stdout = timed(cmd, out / f"{tag}.log", env)
    rep = json.loads(stdout.strip().splitlines()[-1])
    return {"method": method, "dtype": dtype, "seconds": seconds, "auc": rep["auc_mean"], "auc_std": rep["auc_std"],
            "recall": rep["recall_mean"], "recall_std": rep["recall_std"], "command": " ".join(cmd)}


def run_official(args, data_dir: Path, task: str, model: Path, env: dict, out: Path, val_labels, train_labels) -> dict:
    import torch

    from forvalue.indexer import metrics

    scores_path = out / "official_scores.pt"
    cmd = [args.official_python, "forvalue_streaming.py", "--model_name", str(model), "--local_files_only",
           "--dataset_dir", str(data_dir), "--dataset_name", task, "--embed_device", "cpu",
           "--score_device", "cpu", "--batch_size", str(args.batch_size), "--vocab_mode", "topk_unique",
           "--prediction_topk", str(args.topk), "--lowest_likelihood_ratio", "1.0",
           "--max_length", str(args.max_length), "--result_path", str(out / "official_result.json"),
           "--time_path", str(out / "official_time.json"), "--scores_path", str(scores_path)]
    oenv = dict(env)
    if args.official_pythonpath:
        oenv["PYTHONPATH"] = os.pathsep.join(p for p in (args.official_pythonpath, env.get("PYTHONPATH")) if p)
    seconds, _ = timed(cmd, out / "official.log", oenv, cwd=Path(args.official))
    S = torch.load(scores_path).double().numpy()
    rep = metrics.evaluate(S, val_labels, train_labels)
    own = json.loads((out / "official_result.json").read_text())
    return {"seconds": seconds, "auc": rep["auc_mean"], "auc_std": rep["auc_std"], "recall": rep["recall_mean"],
            "recall_std": rep["recall_std"], "own_metric_auc": own["proposed_auc"],
            "own_metric_recall": own["proposed_recall"], "command": " ".join(cmd), "cwd": str(args.official)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="folder holding the official forvalue_streaming.py and utils.py")
    ap.add_argument("--official-python", default=sys.executable, help="interpreter for the official code")
    ap.add_argument("--official-pythonpath", default=None, help="extra PYTHONPATH for it (e.g. where `datasets` is)")
    ap.add_argument("--datainf", required=True, help="folder holding <task>_train.hf and <task>_test.hf")
    ap.add_argument("--task", default="grammars")
    ap.add_argument("--model", default=None, help="HF model directory for both [default: forvalue's converted "
                                                  "SmolLM2-135M-Instruct cache entry]")
    ap.add_argument("--method", default="inbatch", help="forvalue method compared with the official code")
    ap.add_argument("--same-text", action="store_true", help="forvalue scores DataInf's text as the official code "
                                                               "does (literal </s> kept), see above")
    ap.add_argument("--no-exact", action="store_true", help="skip the forvalue exact run")
    ap.add_argument("--no-repeat", action="store_true", help="skip the second forvalue --method run")
    ap.add_argument("--batch-size", type=int, default=32, help="official --batch_size (forvalue's inbatch_size)")
    ap.add_argument("--topk", type=int, default=5, help="official --prediction_topk (forvalue's inbatch_topk)")
    ap.add_argument("--max-length", type=int, default=300,
                    help="official --max_length (its default; it pads every row to this, 72 fits every grammars row)")
    ap.add_argument("--forvalue-dtype", default="auto", help="forvalue's --dtype (bfloat16: half-precision forward "
                    "passes, faster on CPUs with AVX512-BF16/AMX; the official code runs in fp32 on a CPU)")
    ap.add_argument("--no-official", action="store_true", help="skip the official run (forvalue runs only)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of both")
    ap.add_argument("--out", required=True, help="folder for logs and the official score matrix")
    args = ap.parse_args()

    from forvalue.indexer.data import load_eval_sets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.datainf).resolve()
    model = Path(args.model) if args.model else default_model_dir()
    valuation, train = load_eval_sets(data_dir / args.task)
    val_labels, train_labels = [s.label for s in valuation], [s.label for s in train]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")

    def step(name: str, result: dict) -> dict:
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
        return result

    data = write_same_text(data_dir, args.task, out) if args.same_text else data_dir / args.task
    dt = args.forvalue_dtype
    runs = [step("forvalue", run_forvalue(data, model, args.method, env, out, "forvalue_1", dt))]
    if args.no_official:
        print(json.dumps({"forvalue": runs}), flush=True)
        return
    official = step("official", run_official(args, data_dir, args.task, model, env, out, val_labels, train_labels))
    exact = None if args.no_exact else step("forvalue_exact", run_forvalue(data, model, "exact",
                                                                           env, out, "forvalue_exact", dt))
    if not args.no_repeat:
        runs.append(step("forvalue_again", run_forvalue(data, model, args.method, env, out,
                                                         "forvalue_2", dt)))
    fv_seconds = max(r["seconds"] for r in runs)  # the slower forvalue run: the ratio is not flattered by noise
    report = {
        "task": args.task, "same_text": args.same_text, "n_valuation": len(valuation), "n_train": len(train),
        "model": str(model),
        "threads": args.threads, "forvalue": runs, "forvalue_exact": exact, "official": official,
        "forvalue_seconds": fv_seconds, "official_seconds": official["seconds"],
        "time_ratio": fv_seconds / official["seconds"],
        "auc_diff": runs[0]["auc"] - official["auc"], "recall_diff": runs[0]["recall"] - official["recall"],
    }
    report["within_0.005"] = abs(report["auc_diff"]) <= 0.005 and abs(report["recall_diff"]) <= 0.005
    report["ratio_at_most_one_third"] = report["time_ratio"] <= 1 / 3
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
