"""Terminal output of `forvalue query` and `rank`: colours and a compact table on a terminal, plain text else.

The plain forms (what a pipe or a file gets) are those of cli.py, unchanged byte for byte; this module adds
the lines of top token pairs under each hit (`--explain`) and the coloured compact table. Whether to colour:
`--color/--no-color` if given, else colour when the stream is a terminal and NO_COLOR is unset
(https://no-color.org), which is click's own detection (and what click.testing.CliRunner(color=...) sets).
"""

from __future__ import annotations

import json
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


def _fmt(x, fmt) -> str:
    return "-" if x is None else fmt(x)


def _snippet(metadata: dict, width: int) -> str:
    text = " ".join(f"{metadata.get('prompt', '')} → {metadata.get('response', '')}".split())
    if width < 2:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def color_hits(result, source: str, n_queries: int, explain: bool, width: int | None = None) -> str:
    """The hits as a coloured compact table, fitted to the terminal's width (`width`: its columns)."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    group = n_queries > 1
    who = f"the mean of {n_queries} valuation samples" if group else "the valuation sample"
    scored = "all" if result.exact_scored in (None, result.candidates) else str(result.exact_scored)
    lines = [click.style(f"{source} · {result.version}", bold=True)
             + f" · {len(result.hits)} {result.direction} valuable for {who}"
             + click.style(f" · {result.candidates} candidates, {scored} exact", dim=True)]
    scores = [f"{h.score:.5g}" for h in result.hits]
    # calibrated scores (Hit.percentile, Hit.cosine), as columns when any hit has them
    calibrated = [(_fmt(getattr(h, "percentile", None), lambda x: f"{100 * x:.1f}%"),
                   _fmt(getattr(h, "cosine", None), lambda x: f"{x:+.3f}")) for h in result.hits]
    show_cal = any(p != "-" or c != "-" for p, c in calibrated)
    sw = max([5] + [len(s) for s in scores])
    iw = max([2] + [len(h.id) for h in result.hits])
    rw = max(1, len(str(len(result.hits))))
    cal_head = f"{'pct':>6}  {'cos':>6}  " if show_cal else ""
    lines.append(click.style(f"{'#':>{rw}}  {'score':>{sw}}  {cal_head}{'id':<{iw}}  training sample", dim=True))
    for h, s, (p, c) in zip(result.hits, scores, calibrated):
        cal = f"{p:>6}  {c:>6}  " if show_cal else ""
        snippet = _snippet(h.metadata, width - (rw + sw + iw + len(cal) + 6))
        lines.append(f"{click.style(f'{h.rank:>{rw}}', dim=True)}  "
                     f"{click.style(f'{s:>{sw}}', fg='green' if h.score >= 0 else 'red', bold=True)}  "
                     f"{cal}{click.style(f'{h.id:<{iw}}', fg='cyan')}  {snippet}")
        if explain and h.explanation is not None:
            lines.extend(pair_lines(h.explanation, group, color=True, indent=rw + 2))
    return "\n".join(lines)


def color_rank_summary(plain: str) -> str:
    """The rank summary (stderr) with its "forvalue:" prefixes dimmed and the rest bold."""
    out = []
    for line in plain.split("\n"):
        head, sep, rest = line.partition(": ")
        out.append(click.style(head + sep, dim=True) + click.style(rest, bold=True) if sep else line)
    return "\n".join(out)
