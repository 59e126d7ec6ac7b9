"""forvalue's forward pass against a plain padded Hugging Face forward, in one run; prints one JSON object.

Both run the same rows (the first `--rows` of a data file, prompt + response, every position) through the
same model with the same threads, alternating `--repeats` times:

- forvalue: `extract_features(tokens="all")` — length-sorted batches under a token budget, explicit
  positions, the lm_head input captured and log Σ exp(logits) computed in vocabulary chunks;
- plain: the tokenizer pads every row to `--max-length` (as the published For-Value code does), batches
  of `--batch`, `model(**enc)` with its lm_head, then logsumexp over the logits.

Throughput is counted in real (unpadded) tokens per second, so padding shows up as lost time.

    python tools/bench_forward.py --json [--data FILE] [--rows 128] [--max-length 72] [--batch 32] [--model M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="../shared/eval/datainf/grammars_train.hf")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=72, help="padded length of the plain forward")
    ap.add_argument("--batch", type=int, default=32, help="rows per batch of the plain forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()

    from forvalue.indexer.data import read_samples
    from forvalue.indexer.features import ForwardConfig, Head
    from forvalue.indexer.forward import extract_features
    from forvalue.indexer.model import load_model

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    pairs = [(s.prompt, s.response) for s in read_samples(args.data)[: args.rows]]
    head = Head.from_model(lm.model)
    tok = lm.tokenizer

    def ours() -> tuple[float, int]:
        t0 = time.perf_counter()
        f = extract_features(lm.model, tok, pairs, ForwardConfig(tokens="all"), head)
        return time.perf_counter() - t0, int(f.h.shape[0]) + len(pairs)  # + the first token of each row

    def plain() -> tuple[float, int]:
        texts = [p + r for p, r in pairs]
        t0 = time.perf_counter()
        n = 0
        for a in range(0, len(texts), args.batch):
            enc = tok(texts[a : a + args.batch], padding="max_length", max_length=args.max_length, truncation=True,
                      return_tensors="pt")
            n += int(enc["attention_mask"].sum())
            torch.logsumexp(lm.model(**enc).logits.float(), -1)
        return time.perf_counter() - t0, n

    extract_features(lm.model, tok, pairs[:8], ForwardConfig(tokens="all"), head)  # warm-up
    rates: dict[str, list[float]] = {"forvalue": [], "plain": []}
    for _ in range(args.repeats):
        for name, fn in (("forvalue", ours), ("plain", plain)):
            t, n = fn()
            rates[name].append(n / t)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "model": lm.name, "rows": len(pairs), "plain_max_length": args.max_length, "plain_batch": args.batch,
        "threads": torch.get_num_threads(),
        "forvalue_tokens_per_s": round(med["forvalue"], 1), "plain_tokens_per_s": round(med["plain"], 1),
        "forvalue_over_plain": round(med["forvalue"] / med["plain"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }))


if __name__ == "__main__":
    main()
