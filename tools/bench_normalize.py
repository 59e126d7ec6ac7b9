"""Raw For-Value against unit-normalised values (BuildConfig.normalize = "unit": S(v, i) / ‖G_i‖) on labelled
tasks, from the same features: AUC and Recall (the DataInf / For-Value protocol, metrics.evaluate) of both, per
task and token scope. Prints one JSON object.

    python tools/bench_normalize.py --datainf ../shared/eval/datainf --json
    python tools/bench_normalize.py --data example.jsonl --tokens response --json

Issue 17: a variant becomes a default only if it is better on the fact-tracing set and not worse here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from forvalue.indexer import metrics
from forvalue.indexer.data import load_eval_sets
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.model import load_model
from forvalue.indexer.score import exact_scores, g_norms, unit_scale

DATAINF_TASKS = ("grammars", "math_with_reason", "math_without_reason")


def compare(lm, data: str, tokens: str) -> dict:
    """AUC / Recall of raw and unit values for one labelled set and token scope."""
    valuation, train = load_eval_sets(data)
    head = Head.from_model(lm.model)
    dev = head.weight.device
    t0 = time.perf_counter()
    fv, ft = (extract_features(lm.model, lm.preprocessor, [s.as_input() for s in part], ForwardConfig(tokens=tokens),
                               head) for part in (valuation, train))
    S = exact_scores(fv.to(dev), ft.to(dev), head).double().cpu()
    norms = g_norms(ft.to(dev), head).double().cpu()
    out = {"n_valuation": fv.n, "n_train": ft.n}
    vl, tl = [s.label for s in valuation], [s.label for s in train]
    for name, values in (("raw", S), ("unit", S * unit_scale(norms)[None, :])):
        m = metrics.evaluate(values.numpy(), vl, tl)
        out.update({f"{name}_auc": round(m["auc_mean"], 4), f"{name}_recall": round(m["recall_mean"], 4)})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datainf", default=None, help="the DataInf folder (its three tasks)")
    ap.add_argument("--data", action="append", default=[], help="a labelled file or DataInf prefix (repeatable)")
    ap.add_argument("--tokens", action="append", choices=("response", "all"), default=None,
                    help="token scope(s) [default: response and all]")
    ap.add_argument("--model", default=None, help="HF directory or .gguf [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()
    sets = list(args.data) + ([str(Path(args.datainf) / t) for t in DATAINF_TASKS] if args.datainf else [])
    if not sets:
        ap.error("give --datainf or --data")
    torch.set_grad_enabled(False)
    lm = load_model(args.model, device=args.device)
    report: dict = {"model": lm.name, "device": args.device}
    for data in sets:
        for tokens in args.tokens or ["response", "all"]:
            r = compare(lm, data, tokens)
            report[f"{Path(data).name}/{tokens}"] = r
            print(f"[bench_normalize] {Path(data).name}/{tokens}: {r}", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
