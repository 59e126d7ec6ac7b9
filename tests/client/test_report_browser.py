"""The HTML reports rendered by a real headless Chromium: a non-trivial screenshot, and the DOM it built.

Needs /usr/bin/chromium (Debian packages chromium and chromium-driver); skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main

from serving import corpus

CHROMIUM = "/usr/bin/chromium"
PROMPT, RESPONSE = "Reverse: red cat sun ->", " sun cat red"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not found: install the Debian packages chromium and chromium-driver "
           "(apt-get install -y chromium chromium-driver) to render the HTML reports in a real browser")


def chromium(tmp_path, url: str, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1200,2000", *mode, url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def png_pixels(path) -> tuple[int, int, set]:
    """(width, height, a set of distinct pixel values over a sample of rows), with PIL if it is installed."""
    try:
        from PIL import Image
    except ImportError:  # PNG by hand: IHDR for the size, IDAT inflated for the (filtered) bytes
        data = path.read_bytes()
        w, h = struct.unpack(">II", data[16:24])
        chunks, i = [], 8
        while i < len(data):
            n = struct.unpack(">I", data[i : i + 4])[0]
            if data[i + 4 : i + 8] == b"IDAT":
                chunks.append(data[i + 8 : i + 8 + n])
            i += 12 + n
        raw = zlib.decompress(b"".join(chunks))
        return w, h, set(raw[:: max(1, len(raw) // 50_000)])
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        return w, h, {im.getpixel((x, y)) for y in range(0, h, 20) for x in range(0, w, 7)}


def shot(tmp_path, html) -> None:
    png = tmp_path / (html.stem + ".png")
    chromium(tmp_path, html.as_uri(), f"--screenshot={png}")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, values = png_pixels(png)
    assert (w, h) == (1200, 2000)
    assert len(values) > 20, f"the screenshot is (nearly) one colour: {sorted(values)[:5]}"


class DomTags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def dom(tmp_path, html) -> tuple[str, list[tuple[str, dict]]]:
    text = chromium(tmp_path, html.as_uri(), "--dump-dom").stdout
    parser = DomTags()
    parser.feed(text)
    return text, parser.tags


@pytest.fixture(scope="module")
def index_args(served_index, served_model_dir):
    return ["--index", served_index[0], "--model", served_model_dir]


def test_query_report_in_chromium(tmp_path, index_args, local_index):
    html = tmp_path / "query.html"
    r = CliRunner().invoke(main, ["query", *index_args, "--prompt", PROMPT, "--response", RESPONSE, "-k", "3",
                                  "--rerank", "12", "--html", str(html)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    shot(tmp_path, html)
    text, tags = dom(tmp_path, html)
    articles = {a["id"]: a for t, a in tags if t == "article"}
    for direction in ("most", "least"):
        for h in local_index.search([(PROMPT, RESPONSE)], k=3, direction=direction, rerank=12).hits:
            assert articles[f"{direction}-{h.rank}"]["data-id"] == h.id
            assert f">{h.id}</code>" in text
    assert any(a.get("id") == "legend" for _, a in tags) and "raises the score" in text
    spans = [a for t, a in tags if t == "span" and "tok" in a.get("class", "").split()]
    assert spans and all(re.fullmatch(r"[-+0-9.e]+", a["data-contribution"]) for a in spans)
    assert all(a["title"].endswith(f"{float(a['data-contribution']):+.6g}") for a in spans)
    assert {"query", "train"} <= {c for a in spans for c in a["class"].split()}
    assert any(float(a["data-contribution"]) != 0 and "rgb(255,255,255)" not in a["style"].replace(" ", "")
               for a in spans)


def test_rank_report_in_chromium(tmp_path, index_args):
    valuation = tmp_path / "valuation.jsonl"
    valuation.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n"
                                 for s in corpus(2, seed=3, prefix="v")))
    html = tmp_path / "rank.html"
    r = CliRunner().invoke(main, ["rank", *index_args, "--valuation", str(valuation), "--out",
                                  str(tmp_path / "scores.jsonl"), "--select", "5", "--html", str(html), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    shot(tmp_path, html)
    text, tags = dom(tmp_path, html)
    assert any(t == "svg" for t, _ in tags)
    (cut,) = [a for t, a in tags if a.get("id") == "cutoff"]
    assert float(cut["data-value"]) == pytest.approx(summary["cutoff_score"], rel=1e-5)
    bins = [a for t, a in tags if t == "g" and a.get("class") == "bin"]
    assert sum(int(a["data-count"]) for a in bins) == 36 and sum(int(a["data-selected"]) for a in bins) == 5
    assert "cut-off" in text
