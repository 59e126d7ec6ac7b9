"""Bearer-token authentication and TLS of the influence service, on localhost (port 0) through the real client.

Two servers: one with a token over plaintext, one with a token over TLS (a throw-away CA and server
certificate made with the `openssl` command); the session's `influence_server` is the one without either.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from forvalue.client.cli import main
from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import ConfigError
from forvalue.server.app import create_server
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc
from forvalue.server.security import UNAUTHENTICATED_MESSAGE, read_token_file, server_credentials

from serving import ServerThread, corpus

TOKEN = "s3cret-Token_0123"
QUERIES = [(s.prompt, s.response) for s in corpus(2, seed=5, prefix="q")]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _openssl(*args, cwd):
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"openssl {' '.join(args)} failed: {out.stderr}"


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{ca, ca_key, cert, key, other_ca}: a CA, a server certificate it signed for localhost and 127.0.0.1,
    and a second CA that signed nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the `openssl` command, which is not on PATH")
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(d, "ca")
    other_ca, _ = _make_ca(d, "other-ca")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2",
             "-days", "2", "-extfile", "server.ext", "-out", "server.pem", cwd=d)
    return {"ca": ca, "ca_key": ca_key, "cert": str(d / "server.pem"), "key": str(d / "server.key"),
            "other_ca": other_ca}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(f"  {TOKEN}\n\n")  # surrounding whitespace is not part of the token
    return str(path)


def _start(config):
    srv = ServerThread(config)
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def auth_server(served_index, served_model_dir):
    """A server that wants TOKEN, over plaintext; yields ServerThread."""
    srv = _start(ServerConfig(index_dir=served_index[0], model_path=served_model_dir, k_cap=20, token=TOKEN))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls_server(served_index, served_model_dir, pki):
    """A server that wants TOKEN, over TLS with pki's server certificate; yields ServerThread."""
    srv = _start(ServerConfig(index_dir=served_index[0], model_path=served_model_dir, k_cap=20, token=TOKEN,
                              tls_cert=pki["cert"], tls_key=pki["key"]))
    yield srv
    srv.stop()


class HandlerSpy:
    """Counts how often the servicer's handlers got past the interceptor (every handler calls `_ready` first)."""

    def __init__(self, servicer):
        self.calls = 0
        self._ready = servicer._ready

    def __call__(self):
        self.calls += 1
        return self._ready()


@pytest.fixture
def spy(auth_server, monkeypatch):
    s = HandlerSpy(auth_server.server.servicer)
    monkeypatch.setattr(auth_server.server.servicer, "_ready", s)
    return s


def _topk_request():
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in QUERIES], k=3)


def _call(stub, method, metadata):
    """Call `method` with `metadata`; returns the ScoreAll chunks received (or the unary reply in a list)."""
    if method == "ScoreAll":
        received = []
        try:
            for chunk in stub.ScoreAll(pb.ScoreAllRequest(samples=_topk_request().samples), timeout=30,
                                       metadata=metadata):
                received.append(chunk)
        except grpc.RpcError as exc:
            exc.received = received
            raise
        return received
    request = _topk_request() if method == "TopK" else pb.InfoRequest()
    return [getattr(stub, method)(request, timeout=30, metadata=metadata)]


BAD_METADATA = {
    "none": (),
    "wrong-token": (("authorization", "Bearer wrong-token"),),
    "token-prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "no-scheme": (("authorization", TOKEN),),
    "basic-scheme": (("authorization", f"Basic {TOKEN}"),),
    "other-key": (("x-token", f"Bearer {TOKEN}"),),
}


@pytest.mark.parametrize("method", ["TopK", "ScoreAll", "Info"])
@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_call_without_the_token_is_unauthenticated_and_never_handled(auth_server, spy, method, case):
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = pb_grpc.InfluenceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            _call(stub, method, BAD_METADATA[case])
        assert err.value.code() == UNAUTHENTICATED and err.value.details() == UNAUTHENTICATED_MESSAGE
        if method == "ScoreAll":
            assert err.value.received == []  # not one chunk of scores before the refusal
        assert spy.calls == 0
        _call(stub, method, (("authorization", f"Bearer {TOKEN}"),))  # the same call with the token is handled
        assert spy.calls == 1


def test_client_error_names_the_status_and_the_fix(auth_server):
    for token in (None, "wrong-token"):
        with InfluenceClient(auth_server.address, token=token, timeout=30) as c:
            for call in (lambda: c.search(QUERIES, k=3), lambda: c.score_all(QUERIES), c.info):
                with pytest.raises(ServerError) as err:
                    call()
                assert err.value.code == UNAUTHENTICATED
                assert "UNAUTHENTICATED" in str(err.value) and "--token-file" in str(err.value)


def test_right_token_answers_as_in_process(auth_server, local_index, served_index):
    with InfluenceClient(auth_server.address, token=TOKEN, timeout=60) as c:
        remote = c.search(QUERIES, k=5, rerank=12)
        ids, scores = c.score_all(QUERIES, chunk_size=10)
        info = c.info()
    ref = local_index.search(QUERIES, k=5, rerank=12)
    assert [h.id for h in remote.hits] == [h.id for h in ref.hits]
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in ref.hits], rtol=1e-5, atol=1e-5)
    assert ids == [s.id for s in served_index[1]]
    np.testing.assert_allclose(scores, local_index.score_matrix(local_index.encode(QUERIES)).mean(0).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert info["index_version"] == local_index.version.name


def test_scheme_name_is_case_insensitive(auth_server):
    with grpc.insecure_channel(auth_server.address) as ch:
        reply = pb_grpc.InfluenceStub(ch).Info(pb.InfoRequest(), timeout=30,
                                               metadata=(("authorization", f"bearer {TOKEN}"),))
    assert reply.n_samples == 36


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_health_needs_no_token(auth_server, token):
    with InfluenceClient(auth_server.address, token=token, timeout=30) as c:
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"


def test_reflection_needs_the_token(auth_server):
    def list_services(metadata):
        with grpc.insecure_channel(auth_server.address) as ch:
            replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30, metadata=metadata)
            return [s.name for r in replies for s in r.list_services_response.service]

    with pytest.raises(grpc.RpcError) as err:
        list_services(())
    assert err.value.code() == UNAUTHENTICATED
    assert SERVICE_NAME in list_services((("authorization", f"Bearer {TOKEN}"),))


def test_no_token_configured_means_no_authentication(influence_server, local_index):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        assert [h.id for h in c.search(QUERIES, k=3).hits] == [h.id for h in local_index.search(QUERIES, k=3).hits]
        assert c.info()["n_samples"] == 36


# --- TLS -------------------------------------------------------------------------------------------------


def test_tls_client_with_the_ca_gets_answers(tls_server, pki, local_index):
    with InfluenceClient(tls_server.address, token=TOKEN, tls=pki["ca"], timeout=60) as c:
        assert c.health() == "SERVING"
        remote = c.search(QUERIES, k=4, rerank=12)
    assert [h.id for h in remote.hits] == [h.id for h in local_index.search(QUERIES, k=4, rerank=12).hits]


def test_tls_still_wants_the_token(tls_server, pki):
    with InfluenceClient(tls_server.address, tls=pki["ca"], timeout=30) as c:
        with pytest.raises(ServerError) as err:
            c.info()
    assert err.value.code == UNAUTHENTICATED


@pytest.mark.parametrize("tls", [None, "other_ca"], ids=["plaintext", "untrusted-ca"])
def test_tls_server_refuses_plaintext_and_untrusted_clients(tls_server, pki, tls):
    # UNAVAILABLE (a failed handshake), not DEADLINE_EXCEEDED (a hang until the timeout)
    with InfluenceClient(tls_server.address, token=TOKEN, tls=pki.get(tls), timeout=20) as c:
        with pytest.raises(ServerError) as err:
            c.info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value


@pytest.mark.parametrize("field,value,named", [
    ("tls_cert", "missing.pem", "missing.pem"),
    ("tls_key", "missing.key", "missing.key"),
    ("tls_cert", "garbage", "garbage.pem"),
    ("tls_cert", "ca_key", "ca.key"),    # a key where the certificate belongs
    ("tls_key", "ca_key", "ca.key"),     # a key, but not the certificate's
    ("tls_key", "cert", "server.pem"),   # a certificate where the key belongs
])
def test_bad_tls_file_is_a_config_error_naming_it(pki, served_index, tmp_path, field, value, named):
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    paths = {"missing.pem": str(tmp_path / "missing.pem"), "missing.key": str(tmp_path / "missing.key"),
             "garbage": str(tmp_path / "garbage.pem"), **pki}
    config = ServerConfig(index_dir=served_index[0], tls_cert=pki["cert"], tls_key=pki["key"])
    assert server_credentials(config) is not None  # the good pair is accepted
    config = ServerConfig(index_dir=served_index[0], **{"tls_cert": pki["cert"], "tls_key": pki["key"],
                                                        field: paths[value]})
    with pytest.raises(ConfigError) as err:
        create_server(config)
    assert named in str(err.value) and field in str(err.value), err.value


# --- configuration and the token file --------------------------------------------------------------------


@pytest.mark.parametrize("given,missing", [("tls_cert", "tls_key"), ("tls_key", "tls_cert")])
def test_tls_needs_both_files(given, missing):
    with pytest.raises(ConfigError, match=f"^{missing} is missing"):
        ServerConfig(index_dir="idx", **{given: "x.pem"})


@pytest.mark.parametrize("token", ["", "two words", "new\nline", "naïve"])
def test_token_must_be_printable_ascii(token):
    with pytest.raises(ConfigError, match="token must be"):
        ServerConfig(index_dir="idx", token=token)


def test_token_stays_out_of_repr():
    assert TOKEN not in repr(ServerConfig(index_dir="idx", token=TOKEN))


def test_read_token_file(token_file, tmp_path):
    assert read_token_file(token_file) == TOKEN
    (tmp_path / "empty").write_text(" \n")
    for path in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(ConfigError, match=f"token file {path}: "):
            read_token_file(str(path))


# --- the command line ------------------------------------------------------------------------------------


def _query(*args, env=None):
    env = {"FORVALUE_TOKEN": None, **(env or {})}  # None: unset in the command's environment
    return CliRunner().invoke(main, ["query", "--prompt", QUERIES[0][0], "--response", QUERIES[0][1], "-k", "3",
                                     "--json", *args], env=env)


def _expect_hits(r, local_index):
    assert r.exit_code == 0, r.output
    ref = local_index.search(QUERIES[:1], k=3)
    assert [h["id"] for h in json.loads(r.stdout)["hits"]] == [h.id for h in ref.hits]


def test_cli_query_with_token_file_or_env(auth_server, token_file, local_index):
    _expect_hits(_query("--server", auth_server.address, "--token-file", token_file), local_index)
    _expect_hits(_query("--server", auth_server.address, env={"FORVALUE_TOKEN": TOKEN}), local_index)


def test_cli_query_over_tls(tls_server, token_file, pki, local_index):
    _expect_hits(_query("--server", tls_server.address, "--token-file", token_file, "--tls-ca", pki["ca"]),
                 local_index)


@pytest.mark.parametrize("args,env,message", [
    ([], None, "UNAUTHENTICATED: missing or invalid bearer token"),
    ([], {"FORVALUE_TOKEN": "wrong-token"}, "UNAUTHENTICATED"),
    ([], {"FORVALUE_TOKEN": " "}, "FORVALUE_TOKEN is set but empty"),
    (["--token-file", "EMPTY"], None, "is empty"),
])
def test_cli_query_token_errors_are_one_line_exit_2(auth_server, tmp_path, args, env, message):
    (tmp_path / "empty").write_text("")
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    r = _query("--server", auth_server.address, *args, env=env)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("forvalue: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--tls-cert", "CERT"], "tls_key is missing"),
    (["--tls-cert", "CERT", "--tls-key", "ABSENT"], "ABSENT"),
    (["--token-file", "ABSENT"], "token file ABSENT"),
])
def test_cli_serve_security_errors_exit_2_before_serving(served_index, pki, tmp_path, args, message):
    names = {"CERT": pki["cert"], "ABSENT": str(tmp_path / "absent")}
    r = CliRunner().invoke(main, ["serve", "--index", served_index[0], "--port", "0",
                                  *[names.get(a, a) for a in args]], env={"FORVALUE_TOKEN": None})
    assert r.exit_code == 2, r.output
    assert " ".join(names.get(w, w) for w in message.split()) in r.stderr, r.stderr
    assert "listening" not in r.stderr
