"""Tamper evidence: with a signing key (FORVALUE_SIGNING_KEY_FILE), every published version carries an HMAC of
its manifest, and only versions signed with that key are read. Checksums alone catch corruption, not an attacker
who rewrites a file and recomputes them: the signature does."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.deletion import delete_samples
from forvalue.indexer.errors import ConfigError, IndexCorruptError
from forvalue.indexer.files import sha256_file
from forvalue.indexer.store import IndexRoot
from forvalue.indexer.store_format import SIGNATURE_FILE, SIGNING_KEY_ENV, manifest_bytes

from serving import corpus

CFG = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=16), shard_size=8)


@pytest.fixture
def keys(tmp_path):
    good, other = tmp_path / "key", tmp_path / "other-key"
    good.write_text("k" * 32 + "\n")
    other.write_text("o" * 32 + "\n")
    return good, other


def attack(version_dir, rows_file: str) -> None:
    """Rewrite one stored row and recompute every checksum an honest build would have written."""
    path = version_dir / rows_file
    lines = path.read_bytes().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["response"] = " PWNED" + " " * max(0, len(row["response"]) - 6)
    new = json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()
    new = new[: len(lines[0]) - 1].ljust(len(lines[0]) - 1) + b"\n"  # same length: row offsets stay valid
    path.write_bytes(new + b"".join(lines[1:]))
    manifest = json.loads((version_dir / "manifest.json").read_bytes())
    digest, size = sha256_file(path)
    manifest["files"][rows_file] = {"sha256": digest, "bytes": size}
    done = json.loads((path.parent / "_DONE.json").read_bytes())
    done["files"][path.name] = {"sha256": digest, "bytes": size}
    (path.parent / "_DONE.json").write_text(json.dumps(done, sort_keys=True, indent=1) + "\n")
    d2, s2 = sha256_file(path.parent / "_DONE.json")
    manifest["files"][rows_file.rsplit("/", 1)[0] + "/_DONE.json"] = {"sha256": d2, "bytes": s2}
    (version_dir / "manifest.json").write_bytes(manifest_bytes(manifest))


def test_signed_versions_are_read_and_tampered_ones_refused(tmp_path, served_lm, keys, monkeypatch):
    good, other = keys
    root = tmp_path / "idx"
    monkeypatch.setenv(SIGNING_KEY_ENV, str(good))
    name = build_index(str(root), corpus(16), served_lm, CFG)
    vdir = root / "versions" / name
    assert (vdir / SIGNATURE_FILE).is_file()
    IndexRoot(root).load(verify=True).close()  # signed with the key: read
    delete_samples(str(root), ["s3"])  # a takedown publishes a signed version too
    IndexRoot(root).load(verify=True).close()

    monkeypatch.setenv(SIGNING_KEY_ENV, str(other))
    with pytest.raises(IndexCorruptError, match="does not match the configured signing key"):
        IndexRoot(root).load()
    monkeypatch.delenv(SIGNING_KEY_ENV)
    IndexRoot(root).load(name).close()  # no key configured: signatures are not required

    attack(vdir, "shards/000000/metadata.jsonl")
    with IndexRoot(root).load(name, verify=True) as v:  # the checksums agree: without a key it goes unnoticed
        assert v.rows([0])[0]["response"].startswith(" PWNED")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(good))
    with pytest.raises(IndexCorruptError, match="does not match"):
        IndexRoot(root).load(name)
    r = CliRunner().invoke(main, ["index", "info", "--index", str(root), "--version", name])
    assert r.exit_code == 2 and "signing key" in r.output and len(r.output.strip().splitlines()) == 1


def test_an_unsigned_index_is_refused_when_a_key_is_configured(tmp_path, served_lm, keys, monkeypatch):
    root = tmp_path / "idx"
    build_index(str(root), corpus(16), served_lm, CFG)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(keys[0]))
    with pytest.raises(IndexCorruptError, match="not signed"):
        IndexRoot(root).load()


def test_a_short_or_missing_key_file_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "short").write_text("abc")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        IndexRoot(tmp_path)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the signing key file"):
        IndexRoot(tmp_path)
