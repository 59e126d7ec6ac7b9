"""Bad input through gRPC and through `forvalue query --server`: the documented status (or exit 2 and one line),
never INTERNAL, and the server stays healthy after each.

Documented (README, the service): a bad field is INVALID_ARGUMENT naming it; a message that is not a
request (garbage, invalid UTF-8 in a string) INVALID_ARGUMENT "request: ..."; a message over
max_message_bytes RESOURCE_EXHAUSTED (grpc's own check, before the server reads it).
"""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc

from harness import QUERIES, assert_healthy, request, start

MAX_MESSAGE = 2 * 1024 * 1024
MB = "Upper: red cat " * (1_000_000 // 15)  # a 1 MB prompt, 10 x the default max_sample_chars
OVERSIZED = "x" * (MAX_MESSAGE + 1024)  # > max_message_bytes once in a message


@pytest.fixture(scope="module")
def server(served_index, local_index):
    srv = start(served_index[0], lambda: local_index, max_message_bytes=MAX_MESSAGE)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _bytes(message) -> bytes:
    return message.SerializeToString()


def _utf8_broken() -> bytes:
    """A TopKRequest whose prompt holds the bytes ff fe (not UTF-8): what a careless client in C could send."""
    raw = _bytes(request([("AB", " r")]))
    assert raw.count(b"AB") == 1
    return raw.replace(b"AB", b"\xff\xfe")


def _sample(**fields):
    return pb.TopKRequest(samples=[pb.ValuationSample(**fields)], k=3)


# (case, raw request bytes, status, what the details start with); every raw request goes to TopK
GRPC_CASES = [
    ("empty response", lambda: _bytes(_sample(prompt="p", response="")), "INVALID_ARGUMENT", "samples[0].response: "),
    ("whitespace response", lambda: _bytes(_sample(prompt="p", response=" \t\n ")), "INVALID_ARGUMENT",
     "samples[0].response: "),
    ("invalid UTF-8", _utf8_broken, "INVALID_ARGUMENT", "request: not a valid forvalue.v1.TopKRequest"),
    ("1 MB prompt", lambda: _bytes(_sample(prompt=MB, response=" r")), "INVALID_ARGUMENT",
     "samples[0].prompt: at most 100000 characters"),
    ("1 MB response", lambda: _bytes(_sample(prompt="p", response=MB)), "INVALID_ARGUMENT",
     "samples[0].response: at most 100000 characters"),
    ("k = 0", lambda: _bytes(request(QUERIES[:1], k=0)), "INVALID_ARGUMENT", "k: must be between 1 and 20, got 0"),
    ("k above the cap", lambda: _bytes(request(QUERIES[:1], k=21)), "INVALID_ARGUMENT",
     "k: must be between 1 and 20, got 21"),
    ("negative rerank", lambda: _bytes(request(QUERIES[:1], rerank=-3)), "INVALID_ARGUMENT", "rerank: must be >= 0"),
    ("direction 99", lambda: _bytes(request(QUERIES[:1], direction=99)), "INVALID_ARGUMENT",
     "direction: unknown value 99"),
    ("garbage", lambda: b"\x0a\xff\xff\xff\xff\x0f" + bytes(range(256)), "INVALID_ARGUMENT", "request: "),
    ("not even a tag", lambda: b"\xff" * 64, "INVALID_ARGUMENT", "request: "),
    ("image on a text index", lambda: _bytes(_sample(response=" r", image=b"\x89PNG\r\n", image_mime_type="image/png")),
     "INVALID_ARGUMENT", "samples[0].image: this index is text-only"),
    ("oversized message", lambda: _bytes(_sample(prompt=OVERSIZED, response=" r")), "RESOURCE_EXHAUSTED", ""),
]


@pytest.mark.parametrize("case,raw,code,details", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input_gets_its_status_and_the_server_stays_healthy(channel, local_index, case, raw, code, details):
    topk = channel.unary_unary(f"/{SERVICE_NAME}/TopK")  # bytes in, bytes out: nothing checked on our side
    with pytest.raises(grpc.RpcError) as err:
        topk(raw(), timeout=30)
    assert err.value.code().name == code, err.value.details()
    assert err.value.details().startswith(details), err.value.details()
    assert len(err.value.details()) < 300  # names the problem; never echoes a megabyte back
    assert_healthy(channel, local_index)


@pytest.mark.parametrize("case,sample,details", [
    ("invalid UTF-8", None, "request: not a valid forvalue.v1.ScoreAllRequest"),
    ("1 MB prompt", pb.ValuationSample(prompt=MB, response=" r"), "samples[0].prompt: at most 100000"),
    ("image on a text index", pb.ValuationSample(response=" r", image=b"\x89PNG", image_mime_type="image/png"),
     "samples[0].image: "),
])
def test_score_all_bad_input_too(channel, local_index, case, sample, details):
    if sample is None:
        raw = _bytes(pb.ScoreAllRequest(samples=[pb.ValuationSample(prompt="AB", response=" r")]))
        raw = raw.replace(b"AB", b"\xc3\x28")  # an invalid 2-byte sequence
    else:
        raw = _bytes(pb.ScoreAllRequest(samples=[sample]))
    stream = channel.unary_stream(f"/{SERVICE_NAME}/ScoreAll")
    with pytest.raises(grpc.RpcError) as err:
        list(stream(raw, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(details), \
        err.value.details()
    assert_healthy(channel, local_index)


def test_the_limit_is_configurable_and_counts_characters(served_index, local_index):
    srv = start(served_index[0], lambda: local_index, max_sample_chars=10, watch_seconds=0)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.InfluenceStub(ch)
            ok = stub.TopK(request([("é" * 10, " ü" * 5)]), timeout=30)  # 10 characters, 20 bytes: allowed
            assert ok.answers[0].hits
            with pytest.raises(grpc.RpcError) as err:
                stub.TopK(request([("p", " " + "r" * 10)]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == ("samples[0].response: at most 10 characters (the server's "
                                           "--max-sample-chars), got 11")
    finally:
        srv.stop()


def test_cli_serve_sets_the_limit(monkeypatch, tmp_path):
    import forvalue.server.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda config, address, announce=print: seen.update(config=config))
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path), "--port", "0", "--max-sample-chars", "7"],
                           env={"FORVALUE_TOKEN": None})
    assert r.exit_code == 0, r.output
    assert seen["config"].max_sample_chars == 7


# --- the same through the CLI: exit 2, exactly one line on stderr -------------------------------------------
# (an unknown direction, garbage bytes and an image cannot be expressed on the command line)

CLI_CASES = [
    ("empty response", ["--response", ""], "--response must not be empty"),
    ("whitespace response", ["--response", " \t "], "--response must not be empty"),
    # what Python makes of undecodable argv bytes (surrogateescape): protobuf cannot carry it
    ("invalid UTF-8", ["--prompt", "caf\udcc3\udca9", "--response", " r"], "samples[0].prompt: not valid UTF-8"),
    ("1 MB prompt", ["--prompt", MB, "--response", " r"], "INVALID_ARGUMENT: samples[0].prompt: at most 100000"),
    ("k = 0", ["--response", " r", "-k", "0"], "INVALID_ARGUMENT: k: must be between 1 and 20, got 0"),
    ("k above the cap", ["--response", " r", "-k", "21"], "INVALID_ARGUMENT: k: must be between 1 and 20, got 21"),
    ("negative rerank", ["--response", " r", "--rerank", "-1"], "INVALID_ARGUMENT: rerank: must be >= 0"),
    ("oversized message", ["--prompt", OVERSIZED, "--response", " r"], "RESOURCE_EXHAUSTED: "),
]


@pytest.mark.parametrize("case,args,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(server, channel, local_index, case, args, message):
    r = CliRunner().invoke(main, ["query", "--server", server.address, *args], env={"FORVALUE_TOKEN": None})
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("forvalue: error: "), r.stderr[:1000]
    assert message in lines[0] and len(lines[0]) < 300, lines[0]
    assert r.stdout == ""
    assert_healthy(channel, local_index)
