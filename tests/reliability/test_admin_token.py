"""`forvalue serve --enable-admin` without a token refuses to start (issue 18.7): it used to only warn, and an
anonymous InfluenceAdmin/Delete could hide every row. `--insecure-admin` allows it on a loopback host only."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import forvalue.server.app as app
from forvalue.client.cli import main


@pytest.fixture
def started(monkeypatch):
    """The configs `forvalue serve` would have served (nothing is started)."""
    seen = []
    monkeypatch.setattr(app, "serve", lambda config, address, announce=None: seen.append((config, address)))
    monkeypatch.delenv("FORVALUE_TOKEN", raising=False)
    return seen


def _serve(index_dir, *args):
    return CliRunner().invoke(main, ["serve", "--index", str(index_dir), "--port", "0", "--enable-admin", *args])


@pytest.mark.parametrize("args", [(), ("--host", "0.0.0.0"), ("--host", "0.0.0.0", "--insecure-admin"),
                                  ("--host", "10.1.2.3", "--insecure-admin"), ("--host", "::", "--insecure-admin")])
def test_admin_without_a_token_is_refused(tmp_path, started, args):
    r = _serve(tmp_path, *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forvalue: error: --enable-admin needs --token-file"), r.output
    assert started == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_insecure_admin_on_loopback_starts(tmp_path, started, host):
    r = _serve(tmp_path, "--host", host, "--insecure-admin")
    assert r.exit_code == 0, r.output
    assert len(started) == 1 and started[0][0].admin and started[0][0].token is None


def test_admin_with_a_token_starts_on_any_host(tmp_path, started):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    r = _serve(tmp_path, "--host", "0.0.0.0", "--token-file", str(token))
    assert r.exit_code == 0, r.output
    assert started[0][0].admin and started[0][0].token == "s3cret-token"
