"""Fact tracing on a fine-tuned model: which training rows taught it an answer, ranked by forvalue, BM25 and Emb,
scored against the gold statements and causally by tail-patch.

    python tools/bench_facts.py --json                       # a generated set (forvalue example --facts)
    python tools/bench_facts.py --data facts.jsonl --json    # a file in that format

Recipe (issue 17): the training rows (statements and distractors) plus the question/answer rows of a seeded
half of the facts fine-tune the model (AdamW, loss = mean cross-entropy of the response tokens and EOS, seeded
shuffles; checkpoints after `--intermediate-epoch` and after the last epoch, cached under --out by a hash of
rows and settings). On a CPU the default trains the top `--top-layers` 8 layers and the final norm (lr 3e-4;
tailpatch.TopLayers: the frozen layers run once per row); `--top-layers 0 --lr 1e-4` is the issue's recipe
(every weight), what docs/results.md's table runs on a GPU (tools/gpu_facts.sh). The other half's questions
are evaluated: answer accuracy (exact match of the greedy answer tokens), then every method ranks the training
rows (the question/answer rows of the first half included, as negatives) for each question; gold = the
statements of its fact.

Methods: forvalue (through a real index built with the `--index-checkpoint` model and `--normalize`, default
the intermediate checkpoint and unit values: what forvalue recommends for attribution on a fine-tuned model),
forvalue_final and forvalue_pretrained (exact For-Value with the final / base model), bm25 (bm25s, query =
question + answer), emb (the Emb baseline of `forvalue eval --method emb`, base model), random (a floor).
Metrics: MRR, recall@10 (any gold in the top 10), recall@m (share of the m gold rows in the top m); tail-patch
(tailpatch.py) from the final weights at the recipe's lr over the weights it trains: mean Δ log p(answer) of
each method's top-1 and top-10 rows over a seeded sample of `--tailpatch-questions` questions (pairs measured
before are read from the checkpoint's tailpatch.json). `study` holds variants computed from the same features:
checkpoint sums, unit-normalised scores (cosine), and with --study-all-tokens the "all" token scope.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forvalue.indexer import metrics
from forvalue.indexer.config import NORMALIZE, ScoreConfig
from forvalue.indexer.data import Sample, load_eval_sets
from forvalue.indexer.evaluate import index_ranking, peak_rss_mb
from forvalue.indexer.features import Features, ForwardConfig, Head, pad_batch
from forvalue.indexer.forward import encode, extract_features
from forvalue.indexer.model import load_model
from forvalue.indexer.score import exact_scores, g_norms, scores
from forvalue.indexer.tailpatch import TopLayers, response_loss, tail_patch

CHECKPOINTS = ("base", "intermediate", "final")
METHODS = ("forvalue", "forvalue_final", "bm25", "emb", "forvalue_pretrained", "random")


def log(msg: str) -> None:
    print(f"[bench_facts {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def finetune(lm, rows: list[Sample], epochs: int, lr: float, batch: int, seed: int, save_after: int,
             out: Path, threads: int, top_layers: int) -> dict:
    """AdamW on the response loss over the top `top_layers` layers and the final norm (0: every weight);
    saves `out/intermediate` and `out/final`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tok = lm.model, lm.tokenizer
    top = TopLayers(model, top_layers) if top_layers else None
    if top is not None:
        top.freeze()
    model.train()
    opt = torch.optim.AdamW(top.parameters() if top else model.parameters(), lr=lr)
    rng = random.Random(seed)
    losses = []
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            order = list(range(len(rows)))
            rng.shuffle(order)
            total, steps = 0.0, 0
            for a in range(0, len(order), batch):
                pairs = [(rows[j].prompt, rows[j].response) for j in order[a : a + batch]]
                opt.zero_grad()
                loss = response_loss(model, tok, pairs, top=top)
                loss.backward()
                opt.step()
                total, steps = total + float(loss.detach()), steps + 1
            losses.append(total / steps)
            log(f"epoch {epoch}: mean loss {losses[-1]:.3f}")
            if epoch == save_after or epoch == epochs:
                for name in (["intermediate"] if epoch == save_after else []) + (["final"] if epoch == epochs else []):
                    model.save_pretrained(out / name)
                    tok.save_pretrained(out / name)
    model.eval()
    torch.set_num_threads(1)
    return {"epoch_losses": losses}


def answer_accuracy(lm, questions: list[Sample]) -> float:
    """Share of questions whose answer tokens are each the argmax given the ones before (greedy decoding)."""
    cfg = ForwardConfig(add_eos=False)
    hits = []
    with torch.no_grad():
        for a in range(0, len(questions), 32):
            enc = [encode(lm.tokenizer, q.prompt, q.response, cfg) for q in questions[a : a + 32]]
            ids, att, _ = pad_batch([e.ids for e in enc], "right")
            device = next(lm.model.parameters()).device
            pred = lm.model(input_ids=ids.to(device), attention_mask=att.to(device),
                            use_cache=False).logits[:, :-1].argmax(-1).cpu()
            for j, e in enumerate(enc):
                span = slice(e.score_from, len(e.ids) - 1)
                hits.append(bool((pred[j, span] == ids[j, 1:][span]).all()))
    return float(np.mean(hits))


def features(lm, samples, tokens: str, name: str) -> Features:
    return extract_features(lm.model, lm.tokenizer, [s.as_input() for s in samples], ForwardConfig(tokens=tokens),
                            Head.from_model(lm.model), desc=name)


def bm25_scores(train: list[Sample], questions: list[Sample]) -> torch.Tensor:
    import bm25s

    corpus = [f"{s.prompt}{s.response}" for s in train]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, show_progress=False), show_progress=False)
    out = torch.zeros(len(questions), len(train), dtype=torch.float64)
    for i, q in enumerate(questions):
        qt = bm25s.tokenize([f"{q.prompt}{q.response}"], show_progress=False)
        docs, sc = retriever.retrieve(qt, k=len(train), show_progress=False)
        out[i, torch.as_tensor(docs[0].astype(np.int64))] = torch.as_tensor(sc[0], dtype=torch.float64)
    return out


def index_scores(lm, train: list[Sample], questions: list[Sample], root: Path, rerank: int, normalize: str
                 ) -> tuple[torch.Tensor, dict]:
    """The ranking the index gives (first stage top-`rerank` re-ranked exactly, then the sketch order)."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.index import Index

    t0 = time.perf_counter()
    build_index(str(root), train, lm, BuildConfig(normalize=normalize))
    index = Index.open(str(root), lm)
    t1 = time.perf_counter()
    fv = index.encode(questions)
    q = index.query_sketches(fv)
    approx = index.sketch_scores(q).double()
    rows = np.arange(index.n)  # the stored rows' exact values as the index reports them, on the model's device
    dev = index.head.weight.device
    through = index.scaled(exact_scores(fv.to(dev), index.candidate_features(rows).to(dev), index.head).cpu(),
                           rows).double()
    C = min(rerank, index.n)
    _, top_ids = index.ann.search(q.float().numpy(), C, "most")
    empty = torch.zeros(0, dtype=torch.long)
    ranked = torch.stack([index_ranking(approx[i], through[i], torch.from_numpy(top_ids[i]), empty)
                          for i in range(fv.n)])
    return ranked, {"index_build_seconds": t1 - t0, "index_query_seconds": time.perf_counter() - t1}


def tail_patch_cached(final, train: list[Sample], questions: list[Sample], pairs: list[tuple[int, int]], lr: float,
                      top_layers: int, cache: Path) -> dict[tuple[int, int], float]:
    """tail_patch's Δ of every (row, question) pair, the pairs measured before (same checkpoint, lr and
    layers: the file sits in the checkpoint's folder) read from `cache` and the new ones added to it."""
    key = f"lr={lr} top={top_layers}"
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    known = stored.get(key, {})
    name = {p: f"{train[p[0]].id}|{questions[p[1]].id}" for p in pairs}
    todo = [p for p in pairs if name[p] not in known]
    if todo:
        top = TopLayers(final.model, top_layers) if top_layers else None
        delta = tail_patch(final.model, final.tokenizer, [(s.prompt, s.response) for s in train],
                           [(q.prompt, q.response) for q in questions], todo, lr=lr, top=top)
        known.update({name[p]: float(x) for p, x in zip(todo, delta.tolist())})
        stored[key] = known
        cache.write_text(json.dumps(stored) + "\n")
    log(f"tail-patch: {len(todo)} pairs measured, {len(pairs) - len(todo)} from {cache}")
    return {p: known[name[p]] for p in pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a facts JSONL (forvalue example --facts); default: generated")
    ap.add_argument("--people", type=int, default=50)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--templates", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="seeds the generator, the fact split, training and samples")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--intermediate-epoch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW's (and the tail-patch step's) learning rate")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=8,
                    help="fine-tune (and tail-patch) the top N decoder layers and the final norm; 0 = every weight")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for fine-tuning and tail-patch")
    ap.add_argument("--index-checkpoint", choices=CHECKPOINTS, default="intermediate",
                    help="the model the `forvalue` method's index is built with (recommended: intermediate, the "
                         "checkpoint after --intermediate-epoch)")
    ap.add_argument("--normalize", choices=NORMALIZE, default="unit",
                    help="the `forvalue` method's index option (recommended: unit)")
    ap.add_argument("--model", default=None, help="the base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--eval-questions", type=int, default=0, help="cap on evaluated questions (0 = all)")
    ap.add_argument("--tailpatch-questions", type=int, default=40)
    ap.add_argument("--study-all-tokens", action="store_true", help="also the 'all' token scope (more passes)")
    ap.add_argument("--out", default="out/bench_facts")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = args.data
    if data is None:
        from forvalue.indexer.facts import write_facts_example

        data = out / f"facts-p{args.people}-f{args.fields}-t{args.templates}-s{args.seed}.jsonl"
        write_facts_example(data, n_people=args.people, n_fields=args.fields, n_templates=args.templates,
                            seed=args.seed)
    valuation, statements = load_eval_sets(data)
    rng = random.Random(args.seed)
    order = list(range(len(valuation)))
    rng.shuffle(order)
    half = len(order) // 2
    qa_train = [valuation[j] for j in sorted(order[:half])]
    questions = [valuation[j] for j in sorted(order[half:])]
    if args.eval_questions:
        questions = questions[: args.eval_questions]
    train = list(statements) + [Sample(id=f"qa/{s.id}", prompt=s.prompt, response=s.response, label=s.label,
                                       split="train", meta=dict(s.meta)) for s in qa_train]
    gold = np.array([[t.label == q.label and t.meta.get("role") == "statement" for t in train] for q in questions])
    log(f"{len(train)} training rows ({len(qa_train)} question/answer rows), {len(questions)} evaluated questions")

    # 1. fine-tune (cached)
    settings = {"epochs": args.epochs, "lr": args.lr, "batch": args.batch, "seed": args.seed,
                "top_layers": args.top_layers,
                "intermediate": args.intermediate_epoch, "loss": "response+eos mean CE", "optimizer": "AdamW"}
    key_src = json.dumps({"rows": [(s.id, s.prompt, s.response) for s in train], "settings": settings,
                          "model": args.model})
    ckpt = out / f"ckpt-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    base = load_model(args.model, device=args.device)
    report: dict = {"finetuned": True, "data": str(data), "n_train": len(train), "n_questions": len(questions),
                    "recipe": settings, "checkpoint_dir": str(ckpt)}
    t0 = time.perf_counter()
    if not (ckpt / "final" / "config.json").is_file():
        tuned = load_model(args.model, device=args.device)
        report.update(finetune(tuned, train, args.epochs, args.lr, args.batch, args.seed, args.intermediate_epoch,
                               ckpt, args.threads, args.top_layers))
        del tuned
    report["finetune_seconds"] = time.perf_counter() - t0
    lms = {"base": base, "intermediate": load_model(ckpt / "intermediate", device=args.device),
           "final": load_model(ckpt / "final", device=args.device)}
    report["answer_accuracy"] = answer_accuracy(lms["final"], questions)
    report["answer_accuracy_base"] = answer_accuracy(base, questions)
    log(f"answer accuracy {report['answer_accuracy']:.3f} (base {report['answer_accuracy_base']:.3f})")

    # 2. features and exact scores per checkpoint (and scope)
    t0 = time.perf_counter()
    S: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    emb = None
    scopes = ["response"] + (["all"] if args.study_all_tokens else [])
    for name, lm in lms.items():
        head = Head.from_model(lm.model)  # scores on the model's device; the features come back on the CPU
        dev = head.weight.device
        for scope in scopes:
            if scope == "all" and name == "intermediate":
                continue
            fv = features(lm, questions, scope, f"{name}-{scope}-questions")
            ft = features(lm, train, scope, f"{name}-{scope}-train")
            S[f"{name}/{scope}"] = exact_scores(fv.to(dev), ft.to(dev), head).double().cpu()
            norms[f"{name}/{scope}"] = g_norms(ft.to(dev), head).double().cpu()
            if name == "base" and scope == "response":
                emb = scores(fv, ft, head.to("cpu"), ScoreConfig(method="emb")).double()
        log(f"scored with {name}")
    report["exact_seconds"] = time.perf_counter() - t0

    # 3. the methods
    t0 = time.perf_counter()
    ranked = {
        "forvalue_pretrained": S["base/response"],
        "forvalue_final": S["final/response"],
        "emb": emb,
        "bm25": bm25_scores(train, questions),
        "random": torch.rand(len(questions), len(train), generator=torch.Generator().manual_seed(args.seed),
                             dtype=torch.float64),
    }
    idx_root = ckpt / f"index-{args.index_checkpoint}-{args.normalize}"
    ranked["forvalue"], timing = index_scores(lms[args.index_checkpoint], train, questions, idx_root, args.rerank,
                                              args.normalize)
    report.update(timing, index_checkpoint=args.index_checkpoint, index_normalize=args.normalize,
                  methods_seconds=time.perf_counter() - t0)
    for m in METHODS:
        for k, v in metrics.retrieval_summary(ranked[m].numpy(), gold, k=10).items():
            report[f"{m}_{k}"] = v
    log("rankings: " + ", ".join(f"{m} {report[f'{m}_recall_at_m']:.3f}" for m in METHODS))

    # 4. study: variants from the same features (metrics only)
    study = {}
    cos = {k: S[k] / norms[k].clamp(min=1e-12)[None, :] for k in S}
    zs = {k: (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True).clamp(min=1e-12) for k, v in S.items()}
    variants = {f"exact {k}": v for k, v in S.items()}
    variants.update({f"cosine {k}": v for k, v in cos.items()})
    r = "response"
    for combo in (("base", "intermediate"), ("base", "final"), ("intermediate", "final"), CHECKPOINTS):
        keys = [f"{c}/{r}" for c in combo]
        variants[f"sum {'+'.join(combo)}"] = sum(S[k] for k in keys)
        variants[f"sum z {'+'.join(combo)}"] = sum(zs[k] for k in keys)
        variants[f"sum cosine {'+'.join(combo)}"] = sum(cos[k] for k in keys)
    for name, v in variants.items():
        study[name] = {k: round(x, 4) for k, x in metrics.retrieval_summary(v.numpy(), gold, k=10).items()}
    report["study"] = study
    best = max(study, key=lambda n: (study[n]["recall_at_m"], study[n]["mrr"]))
    report["study_best"] = best
    log(f"study best: {best} {study[best]}")
    # the rankings are final here: keep them should the (slow) tail-patch be cut short
    (out / f"report-s{args.seed}-rankings.json").write_text(json.dumps(report) + "\n")

    # 5. tail-patch from the final weights
    t0 = time.perf_counter()
    tp_rng = random.Random(args.seed + 1)
    sample = sorted(tp_rng.sample(range(len(questions)), min(args.tailpatch_questions, len(questions))))
    tops = {m: {i: metrics.top_order(ranked[m][i].numpy())[:10].tolist() for i in sample} for m in METHODS}
    pairs = sorted({(r, i) for m in METHODS for i in sample for r in tops[m][i]})
    torch.set_num_threads(args.threads)
    final = lms["final"]
    d = tail_patch_cached(final, train, questions, pairs, args.lr, args.top_layers, ckpt / "tailpatch.json")
    torch.set_num_threads(1)
    for m in METHODS:
        report[f"{m}_tailpatch_top1"] = float(np.mean([d[(tops[m][i][0], i)] for i in sample]))
        report[f"{m}_tailpatch_top10"] = float(np.mean([d[(r, i)] for i in sample for r in tops[m][i]]))
    gold_d = [d[(r, i)] for i in sample for r in tops["forvalue_pretrained"][i] if gold[i, r]]
    report.update(tailpatch_questions=len(sample), tailpatch_steps=len({r for r, _ in pairs}),
                  tailpatch_pairs=len(pairs), tailpatch_seconds=time.perf_counter() - t0,
                  tailpatch_gold_mean=float(np.mean(gold_d)) if gold_d else None)
    report.update(seconds=time.perf_counter() - t_start, peak_memory_mb=peak_rss_mb())
    log("done in %.0f s" % report["seconds"])
    text = json.dumps(report, indent=None if args.json else 2)
    (out / f"report-s{args.seed}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
