"""What the command line prints: plain text, JSON objects, and colours on a terminal.

Every command's text and JSON output is made here from the library's results (results.py), so cli.py only
parses options and calls the library. The plain forms are what a pipe or a file gets; on a terminal `query`
shows a coloured compact table instead, with the top token pairs under each hit (`--explain`). Whether to colour:
`--color/--no-color` if given, else colour when the stream is a terminal and NO_COLOR is unset
(https://no-color.org), which is click's own detection (and what click.testing.CliRunner(color=...) sets).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import click


def use_color(flag: bool | None, err: bool = False) -> bool:
    """Colour the output? `flag` (--color/--no-color) wins; else a terminal without NO_COLOR set."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return not click.utils.should_strip_ansi(sys.stderr if err else sys.stdout)


def token_label(token: str, position: int, sample: int | None = None) -> str:
    """A token as text: its JSON-quoted string (newlines and spaces visible) @position (group: @sample:position)."""
    where = f"{sample}:{position}" if sample is not None else str(position)
    return f"{json.dumps(token, ensure_ascii=False)}@{where}"


def pair_lines(explanation, group: bool, color: bool = False, indent: int = 8) -> list[str]:
    """One line per top pair: query token × training token, contribution (coloured by sign if `color`)."""
    pairs = explanation.top_pairs
    if not pairs:
        return []
    q = [token_label(p.query_token, p.query_position, p.query_sample if group else None) for p in pairs]
    t = [token_label(p.train_token, p.train_position) for p in pairs]
    qw, tw = max(map(len, q)), max(map(len, t))
    lines = []
    for a, b, p in zip(q, t, pairs):
        value = f"{p.contribution:+.6g}"
        if color:
            a, b = click.style(a.ljust(qw), fg="yellow"), click.style(b.ljust(tw), fg="yellow")
            value = click.style(value, fg="green" if p.contribution >= 0 else "red")
            lines.append(f"{' ' * indent}{a} × {b}  {value}")
        else:
            lines.append(f"{' ' * indent}{a:<{qw}} × {b:<{tw}}  {value}")
    return lines


def with_pairs(plain: str, result, group: bool) -> str:
    """The plain hit table `plain` (a header line, a column line, one line per hit) with each hit's top pairs
    under its line."""
    lines = plain.split("\n")
    out = lines[:2]
    for line, hit in zip(lines[2:], result.hits):
        out.append(line)
        if hit.explanation is not None:
            out.extend(pair_lines(hit.explanation, group))
    return "\n".join(out)


def snippet(metadata: dict, width: int = 72) -> str:
    """A training row's prompt → response on one line, cut to `width` characters."""
    text = " ".join(f"{metadata.get('prompt', '')} → {metadata.get('response', '')}".split())
    if width < 2:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def color_hits(result, source: str, n_queries: int, explain: bool, width: int | None = None) -> str:
    """The hits as a coloured compact table, fitted to the terminal's width (`width`: its columns)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    group = n_queries > 1
    who = f"the mean of {n_queries} valuation samples" if group else "the valuation sample"
    lines = [click.style(f"{source} · {result.version}", bold=True)
             + f" · {len(result.hits)} {result.direction} valuable for {who}"
             + click.style(f" · {result.candidates} candidates, {scored(result)} exact", dim=True)]
    scores = [score_text(h, 5) for h in result.hits]
    # calibrated scores (Hit.percentile, Hit.cosine), as columns when any hit has them
    calibrated = [(hit_pct(h), cos(h.cosine)) for h in result.hits]
    show_cal = any(p != "-" or c != "-" for p, c in calibrated)
    sw = max([5] + [len(s) for s in scores])
    iw = max([2] + [len(h.id) for h in result.hits])
    rw = max(1, len(str(len(result.hits))))
    pw = max([6] + [len(p) for p, _ in calibrated])
    cal_head = f"{'pct':>{pw}}  {'cos':>6}  " if show_cal else ""
    lines.append(click.style(f"{'#':>{rw}}  {'score':>{sw}}  {cal_head}{'id':<{iw}}  training sample", dim=True))
    for h, s, (p, c) in zip(result.hits, scores, calibrated):
        cal = f"{p:>{pw}}  {c:>6}  " if show_cal else ""
        text = snippet(h.metadata, width - (rw + sw + iw + len(cal) + 6))
        lines.append(f"{click.style(f'{h.rank:>{rw}}', dim=True)}  "
                     f"{click.style(f'{s:>{sw}}', fg='green' if h.score >= 0 else 'red', bold=True)}  "
                     f"{cal}{click.style(f'{h.id:<{iw}}', fg='cyan')}  {text}")
        if explain and h.explanation is not None:
            lines.extend(pair_lines(h.explanation, group, color=True, indent=rw + 2))
    note = certified_note(result)
    return "\n".join(lines + ([click.style(note, dim=True)] if note else []))


def score_text(hit, digits: int) -> str:
    """A hit's score as shown: the exact score, or a certified interval "lo..hi" with "=" after the rank
    when its rank is certified (certified answers)."""
    if hit.score_low is None:
        return f"{hit.score:.{digits}g}"
    mark = "=" if hit.rank_certified else "?"
    return f"{hit.score_low:.{digits}g}..{hit.score_high:.{digits}g} {mark}"


def certified_note(result) -> str:
    """The line under a certified answer saying what its intervals prove; "" for an exact answer."""
    if getattr(result, "scores", "exact") != "certified":
        return ""
    n = len(result.hits)
    sure = sum(1 for h in result.hits if h.rank_certified)
    lead = result.certified_prefix
    whole = {True: "certified", False: "not certified", None: "unknown (merged by a router)"}[result.set_certified]
    return (f"certified scores (exact score within lo..hi): the set of {n} is {whole}; {sure} of {n} ranks "
            f"certified (=), the first {lead} in a row; exact re-ranking of the same candidates agrees there")


def color_rank_summary(plain: str) -> str:
    """The rank summary (stderr) with its "forvalue:" prefixes dimmed and the rest bold (the table of rows
    under it stays plain)."""
    out = []
    for line in plain.split("\n"):
        head, sep, rest = line.partition(": ")
        out.append(click.style(head + sep, dim=True) + click.style(rest, bold=True)
                   if sep and line.startswith("forvalue:") else line)
    return "\n".join(out)


# --- plain text and JSON --------------------------------------------------------------------------------


def jsonable(obj):
    """`obj` with every non-finite float (NaN: a metric undefined for the data) as None, for json.dumps."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    return obj


def dumps(obj) -> str:
    """One JSON object on one line, keys sorted (what every command's --json prints)."""
    return json.dumps(jsonable(obj), sort_keys=True)


def metric(x) -> str:
    """A metric with three decimals, or n/a when undefined (None or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def hit_pct(hit) -> str:
    """A hit's percentile as shown: "98.3%" when exact, "97.1–99.2%" when only an interval is known (a sample
    of a large index), "~98.3%" when neither is said (a router, an older server), "-" when not computed."""
    p, low, high = hit.percentile, getattr(hit, "percentile_low", None), getattr(hit, "percentile_high", None)
    if p is None:
        return "-"
    if low is None or high is None:
        return f"~{pct(p)}"
    if low == high:
        return pct(p)
    return f"{100 * low:.1f}–{pct(high)}"


def cos(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


def scored(result) -> str:
    """How many candidates were scored exactly: "all", or their number."""
    return "all" if result.exact_scored in (None, result.candidates) else str(result.exact_scored)


def eval_text(r: dict) -> str:
    """`forvalue eval`'s report."""
    f = metric
    lines = [
        f"data        {r['data']}",
        f"model       {r['model']}   tokens={r['tokens']}   method={r['method']}",
        f"samples     {r['n_valuation']} valuation x {r['n_train']} training",
        f"AUC         {f(r['auc_mean'])} ± {f(r['auc_std'])}   (over {r['n_rows_scored']} valuation rows)",
        f"Recall      {f(r['recall_mean'])} ± {f(r['recall_std'])}",
    ]
    if metric(r.get("clean_auc")) != "n/a":
        lines.append(f"clean AUC   {f(r['clean_auc'])}   (clean vs corrupted training rows, by mean value)   "
                     f"clean share in top 10%: {f(r['clean_share_top10'])}")
    lines.append(
        f"time        {r['seconds']:.1f} s (load {r['load_seconds']:.1f} s, forward {r['forward_seconds']:.1f} s, "
        f"scores {r['score_seconds']:.1f} s)   peak memory {r['peak_memory_mb']:.0f} MiB"
    )
    return "\n".join(lines)


def index_eval_text(r: dict) -> str:
    """`forvalue eval --index`'s report."""
    f = metric
    return "\n".join([
        f"data        {r['data']}",
        f"index       {r['index']} ({r['index_version']}, {r['n_train']} samples, "
        f"sketch {r['sketch_dim']} dims, rerank {r['rerank']})",
        f"AUC         {f(r['auc_mean'])} through the index (ScoreAll), {f(r['exact_auc_mean'])} exact, "
        f"{f(r['sketch_auc_mean'])} first stage alone",
        f"Recall      {f(r['recall_mean'])} through the index (ScoreAll), {f(r['exact_recall_mean'])} exact, "
        f"{f(r['sketch_recall_mean'])} first stage alone",
        f"fidelity    top-10 most {f(r['fidelity_top10_most'])}, least {f(r['fidelity_top10_least'])} "
        f"(index top-10 vs exact top-10 over all {r['n_train']} rows)",
        f"candidates  recall of the exact top-10 in the first stage's top-{r['rerank']}: "
        f"most {f(r['candidate_recall_most'])}, least {f(r['candidate_recall_least'])}",
        f"time        {r['seconds']:.1f} s   peak memory {r['peak_memory_mb']:.0f} MiB",
    ])


def build_summary(manifest: dict, name: str, storage: dict) -> dict:
    """What `index build` and `index add` print: the new version and its size."""
    m = manifest
    return {"version": name, "n_samples": m["n_samples"], "tokens": m["tokens"], "sketch_dim": m["sketch"]["dim"],
            "normalize": m.get("normalize", "none"), "index": m["index"], "storage": storage,
            "build_seconds": m["build_seconds"], "rerank_store": m.get("rerank_dtype", "float32")}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def build_summary_text(s: dict, index_dir: str, base: str | None = None) -> str:
    """What `index build` and `index add` print without --json: a few lines from `build_summary`'s object."""
    first = s["index"]
    recall = first.get("recall")
    if recall:  # an approximate first stage: its recall@k against flat search, measured at build time
        found = f"recall@{recall.get('k', 10)} {recall['most']:.3f} most, {recall['least']:.3f} least"
    else:
        found = "exact search"
    rows = s["n_samples"]
    total = s["storage"]["total_bytes"]
    from_base = f", from {base}" if base else ""
    return "\n".join([
        f"forvalue: {index_dir}: version {s['version']} is CURRENT ({rows} rows{from_base}), built in "
        f"{s['build_seconds']:.1f} s",
        f"  first stage {first.get('kind', '?')} ({found}); sketch dim {s['sketch_dim']}; tokens {s['tokens']}"
        + ("; values per unit norm (--normalize unit)" if s.get("normalize") == "unit" else ""),
        f"  {_size(total)} on disk ({_size(total / max(rows, 1))} per row, re-rank store "
        f"{s.get('rerank_store', 'float32')}); --json for the whole summary",
    ])


def hits_json(result, source: str, n_queries: int, explain: bool = False) -> dict:
    """`query --json`: one object with the answer's hits (and their explanations with --explain)."""
    import dataclasses

    hits = []
    for h in result.hits:
        d = {"rank": h.rank, "score": h.score, "percentile": h.percentile, "percentile_low": h.percentile_low,
             "percentile_high": h.percentile_high, "cosine": h.cosine, "id": h.id, "row": h.row,
             "metadata": h.metadata}
        if h.score_low is not None:
            d.update(score_low=h.score_low, score_high=h.score_high, rank_certified=h.rank_certified)
        if explain:
            d["explanation"] = None if h.explanation is None else dataclasses.asdict(h.explanation)
        hits.append(d)
    out = {"source": source, "version": result.version, "direction": result.direction,
           "candidates": result.candidates, "exact_scored": result.exact_scored, "n_queries": n_queries, "hits": hits}
    if result.scores == "certified":
        out.update(scores="certified", set_certified=result.set_certified, certified_prefix=result.certified_prefix)
    return out


def hits_text(result, source: str, n_queries: int, explain: bool = False) -> str:
    """`query`'s plain table: a header line, a column line, one line per hit (with its top pairs: --explain)."""
    group = f"the mean of {n_queries} valuation samples" if n_queries > 1 else "the valuation sample"
    lines = [f"{source}, version {result.version}: the {len(result.hits)} {result.direction} valuable training "
             f"samples for {group} ({result.candidates} candidates, {scored(result)} scored exactly)"]
    id_width = max([len("id")] + [len(h.id) for h in result.hits])
    pw = max([6] + [len(hit_pct(h)) for h in result.hits])
    sw = max([12] + [len(score_text(h, 6)) for h in result.hits])
    lines.append(f"{'rank':>4}  {'score':>{sw}}  {'pct':>{pw}}  {'cos':>6}  {'id':<{id_width}}  "
                 "training sample (prompt → response)")
    for h in result.hits:
        lines.append(f"{h.rank:>4}  {score_text(h, 6):>{sw}}  {hit_pct(h):>{pw}}  {cos(h.cosine):>6}  "
                     f"{h.id:<{id_width}}  {snippet(h.metadata)}")
    note = certified_note(result)
    text = "\n".join(lines + ([note] if note else []))
    return with_pairs(text, result, n_queries > 1) if explain else text


def groups_json(result, source: str, n_queries: int) -> dict:
    """`query --group-by --json`."""
    return {"source": source, "version": result.version, "direction": result.direction, "field": result.field,
            "scored": result.scored, "n_queries": n_queries,
            "groups": [{"key": g.key, "count": g.count, "total": g.total, "mean": g.mean,
                        "hits": [{"rank": h.rank, "score": h.score, "id": h.id, "row": h.row, "metadata": h.metadata}
                                 for h in g.hits]} for g in result.groups]}


def groups_text(result, source: str) -> str:
    """`query --group-by`'s table: one line per value of the field."""
    lines = [f"{source}, version {result.version}: value by {result.field} ({result.scored} training samples "
             f"scored exactly, {result.direction} valuable first)"]
    kw = max([len(result.field)] + [len(str(g.key)) for g in result.groups])
    lines.append(f"{result.field:<{kw}}  {'count':>7}  {'total':>12}  {'mean':>12}  top samples")
    for g in result.groups:
        key = "(missing)" if g.key is None else g.key
        top = ", ".join(f"{h.id} ({h.score:.3g})" for h in g.hits)
        lines.append(f"{key:<{kw}}  {g.count:>7}  {g.total:>12.6g}  {g.mean:>12.6g}  {top}")
    return "\n".join(lines)


RANK_TOP = 5  # rows listed by `rank`'s summary


def ranked_rows(ids, rows, values, ranks, percentiles, cosines, texts: dict, which) -> list[dict]:
    """The rows `which` (positions in ids, rank order) as `rank` reports them: rank, id, row, score,
    percentile (share of the other rows with a lower value), cosine (None when unknown) and text (the
    prompt → response snippet, None when unknown)."""
    out = []
    for i in which:
        c = None if cosines is None or not math.isfinite(float(cosines[i])) else float(cosines[i])
        out.append({"rank": int(ranks[i]), "id": str(ids[i]), "row": int(rows[i]), "score": float(values[i]),
                    "percentile": float(percentiles[i]), "cosine": c, "text": texts.get(int(i))})
    return out


def ranked_rows_text(rows: list[dict]) -> list[str]:
    """`rank`'s table of rows (indented lines under the summary)."""
    iw = max([2] + [len(r["id"]) for r in rows])
    lines = [f"  {'rank':>6}  {'score':>12}  {'pct':>6}  {'cos':>6}  {'id':<{iw}}  "
             "training sample (prompt → response)"]
    for r in rows:
        text = "-" if r["text"] is None else r["text"]
        lines.append(f"  {r['rank']:>6}  {r['score']:>12.6g}  {pct(r['percentile']):>6}  {cos(r['cosine']):>6}  "
                     f"{r['id']:<{iw}}  {text}")
    return lines


def rank_summary_text(s: dict) -> str:
    """`rank`'s summary (stderr), with its first rows (`top`) as a table."""
    lines = [f"forvalue: {s['source']}, version {s['version']}: scored {s['n_scored']} training rows by their mean "
             f"value to {s['n_valuation']} valuation samples"]
    if s["n_selected"]:
        lines.append(f"forvalue: selected the {s['n_selected']} {s['direction']}-valued rows "
                     f"(cut-off score {s['cutoff_score']:.6g})")
    lines.append(f"forvalue: wrote the scores to {s['out']}"
                 + (f" and the selected rows to {s['selected_out']}" if s["selected_out"] else ""))
    if s.get("html"):
        lines.append(f"forvalue: wrote the report to {s['html']}")
    if s.get("top"):
        lines.append(f"forvalue: the first {len(s['top'])} rows, {s['direction']} value first (pct: share of the "
                     "other rows with a lower value; cos: -1..1)")
        lines.extend(ranked_rows_text(s["top"]))
    return "\n".join(lines)


def cut_warning(cut_samples) -> str:
    """One stderr line: which valuation samples were longer than the model's max_length (and were cut to it)."""
    shown = ", ".join(str(i) for i in list(cut_samples)[:10]) + (" ..." if len(cut_samples) > 10 else "")
    return (f"forvalue: warning: valuation sample(s) {shown} (0-based) were longer than the index's max_length "
            "and were cut to it: the answer values only the first max_length tokens; shorten them, or build the "
            "index with a larger --max-length")


def sync_text(r: dict) -> str:
    """The one-line summary of `forvalue index sync` (r: its JSON report, `SyncResult.as_dict()` and more)."""
    if r["published"]:
        head = (f"sync {r['before']} -> {r['after']}: {r['rows']} rows ({r['reused']} reused, {r['encoded']} encoded, "
                f"{r['dropped']} dropped, {r['metadata_updated']} metadata updated)")
    else:
        head = f"sync {r['before']}: unchanged, nothing published ({r['rows']} rows)"
    if r.get("refit"):
        head += ", refit: new sketch maps"
    rec = r.get("recall")
    recall = (f"sketch recall@{rec['k']} {rec['most']:.3f}/{rec['least']:.3f} (most/least)" if rec
              else "sketch recall not measured")
    advice = ("refit advised: " + "; ".join(r["reasons"]) + " (run with --refit)") if r["refit_advised"] \
        else "refit not needed"
    return f"{head}, {r['seconds']:.2f} s; {recall}; {r['changed_share']:.1%} encoded since the maps were fit; {advice}"
