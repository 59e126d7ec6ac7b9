"""Which value signal finds the corrupted training rows of a labelled index? Prints one JSON object.

For every training row i of an index whose rows carry `label` and `clean` flags (e.g. `forvalue example --noise`),
and the valuation rows of a file (`--split`), three signals are compared by the AUC of the clean flags (1 = every
clean row valued above every corrupted one) and by how many corrupted rows the lowest-valued n_corrupted rows hold:

- mean: the row's mean value to all valuation rows (what `forvalue rank --lowest` ranks by);
- own_label: its mean value to the valuation rows of its own label;
- own_label_centered: own_label minus the mean of own_label over the rows of that label (a row is compared with
  the other rows of its class).

Usage: python tools/noise_by_label.py --index IDX --valuation FILE [--split test] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from forvalue.indexer.selection import centre_by_label


def signals(S: np.ndarray, val_labels: list[str], train_labels: list[str]) -> dict[str, np.ndarray]:
    """The three signals of the module docstring from S (n_valuation, n_train)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for j, label in enumerate(val_labels):
        by_label[label].append(j)
    own = np.array([S[by_label[lab], i].mean() if by_label.get(lab) else np.nan for i, lab in enumerate(train_labels)])
    return {"mean": S.mean(axis=0), "own_label": own, "own_label_centered": centre_by_label(own, train_labels)}


def main() -> None:
    from forvalue.indexer.data import load_valuation_set
    from forvalue.indexer.index import Index
    from forvalue.indexer.metrics import auc
    from forvalue.indexer.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--valuation", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    index = Index.open(args.index, load_model(args.model))
    valuation = load_valuation_set(args.valuation, split=args.split)
    S = np.stack([index.scores([s.as_input()]).values for s in valuation])
    rows = index.version.rows(list(range(index.n)))
    clean = np.array([r.get("clean") is not False for r in rows])
    n_bad = int((~clean).sum())
    out = {"index": args.index, "n_valuation": len(valuation), "n_train": index.n, "n_corrupted": n_bad}
    for name, v in signals(S, [s.label for s in valuation], [r["label"] for r in rows]).items():
        lowest = np.argsort(v, kind="stable")[:n_bad]
        out[name] = {"clean_auc": round(float(auc(v, clean)), 4), "corrupted_in_lowest": int((~clean[lowest]).sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
