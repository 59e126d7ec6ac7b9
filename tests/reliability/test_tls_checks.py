"""`forvalue serve` refuses a TLS certificate outside its validity dates, or a key of another certificate, at
start and naming the file (issue 18.9); it used to announce "serving" and then fail every handshake."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.server.config import ServerConfig
from forvalue.server.security import server_credentials

CA_CONFIG = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
certificate = ca.pem
private_key = ca.key
serial = serial
default_md = sha256
policy = p
unique_subject = no
[p]
commonName = supplied
"""


def _openssl(*args, cwd):
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"openssl {' '.join(args)} failed: {out.stderr}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """{name: (cert, key)}: server certificates signed by a test CA, valid now / expired / valid from 2099 /
    valid now with the key of another certificate. `openssl ca` sets the dates (-startdate, -enddate)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the `openssl` command, which is not on PATH")
    d = tmp_path_factory.mktemp("tls-dates")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "ca.cnf").write_text(CA_CONFIG)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    dates = {"valid": ("20200101000000Z", "20990101000000Z"), "expired": ("20200101000000Z", "20200102000000Z"),
             "future": ("20990101000000Z", "20990102000000Z"), "other": ("20200101000000Z", "20990101000000Z")}
    out = {}
    for name, (start, end) in dates.items():
        _openssl("req", "-new", *ec, "-subj", "/CN=localhost", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("ca", "-batch", "-config", "ca.cnf", "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext",
                 "-startdate", start, "-enddate", end, cwd=d)
        out[name] = (str(d / f"{name}.pem"), str(d / f"{name}.key"))
    out["mismatched"] = (out["valid"][0], out["other"][1])
    return out


def _serve(index_dir, cert, key):
    return CliRunner().invoke(main, ["serve", "--index", index_dir, "--port", "0", "--tls-cert", cert,
                                     "--tls-key", key, "--watch-seconds", "0"])


@pytest.mark.parametrize("case, words", [("expired", "expired on 2020-01-02 00:00:00 UTC"),
                                         ("future", "not valid before 2099-01-01 00:00:00 UTC"),
                                         ("mismatched", "not an unencrypted PEM private key of the certificate")])
def test_serve_refuses_at_start_naming_the_file(certs, served_index, case, words):
    cert, key = certs[case]
    r = _serve(served_index[0], cert, key)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("forvalue: error:")]
    assert len(errors) == 1 and words in errors[0], r.output
    assert (key if case == "mismatched" else cert) in errors[0]
    assert "serving" not in r.output and "listening" not in r.output


def test_a_certificate_valid_now_is_accepted(certs):
    cert, key = certs["valid"]
    assert server_credentials(ServerConfig(index_dir="unused", tls_cert=cert, tls_key=key)) is not None
