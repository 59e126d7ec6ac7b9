"""The DataInf table: every task × token scope × method, one forward pass per (task, scope).

Prints one JSON object (all rows) on stdout and, with --markdown FILE, writes the table as Markdown.

    python tools/eval_table.py --datainf ../shared/eval/datainf --markdown out/table.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from forvalue.indexer import metrics
from forvalue.indexer.config import METHODS, ScoreConfig
from forvalue.indexer.data import load_eval_sets
from forvalue.indexer.evaluate import peak_rss_mb
from forvalue.indexer.features import Head
from forvalue.indexer.model import load_model
from forvalue.indexer.score import scores

from common import cached_exact, cached_features

TASKS = ("grammars", "math_with_reason", "math_without_reason")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datainf", required=True, help="folder holding <task>_train.hf and <task>_test.hf")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tokens", default="all,response")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--features-cache", default=None, help="folder to keep features and exact scores in")
    args = ap.parse_args()

    lm = load_model(args.model)
    head = Head.from_model(lm.model)
    rows = []
    for task in args.tasks.split(","):
        valuation, train = load_eval_sets(Path(args.datainf) / task)
        for tokens in args.tokens.split(","):
            cache = Path(args.features_cache) if args.features_cache else None
            t0 = time.perf_counter()
            fv = cached_features(lm, head, valuation, tokens, cache, f"{task}-valuation")
            ft = cached_features(lm, head, train, tokens, cache, f"{task}-train")
            fwd_s = time.perf_counter() - t0
            for method in args.methods.split(","):
                t1 = time.perf_counter()
                if method == "exact":
                    S = cached_exact(fv, ft, head, cache, f"{task}-{tokens}")
                else:
                    S = scores(fv, ft, head, ScoreConfig(method=method))
                rep = metrics.evaluate(S.double().numpy(), [s.label for s in valuation], [s.label for s in train])
                row = {"task": task, "tokens": tokens, "method": method, "auc": rep["auc_mean"],
                       "auc_std": rep["auc_std"], "recall": rep["recall_mean"], "recall_std": rep["recall_std"],
                       "forward_seconds": round(fwd_s, 1), "score_seconds": round(time.perf_counter() - t1, 1),
                       "peak_memory_mb": round(peak_rss_mb())}
                rows.append(row)
                print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    out = {"model": lm.name, "rows": rows}
    print(json.dumps(out))
    if args.markdown:
        lines = ["| task | tokens | method | AUC | Recall | score s |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['tokens']} | {r['method']} | {r['auc']:.3f} ± {r['auc_std']:.3f} | "
                         f"{r['recall']:.3f} ± {r['recall_std']:.3f} | {r['score_seconds']} |")
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
