"""Access control of the influence service: the bearer-token interceptor and the TLS credentials.

Authentication is off unless `ServerConfig.token` is set; then every call but grpc.health.v1 (so load
balancers and probes need no secret) must carry `authorization: Bearer <token>` metadata, or it is answered
UNAUTHENTICATED before its handler runs. TLS is on when `ServerConfig.tls_cert` and `tls_key` are set.
A token sent over plaintext can be read on the network: outside localhost, turn on TLS with it.
"""

from __future__ import annotations

import hmac
import ssl
import time

import grpc

from forvalue.indexer.errors import ConfigError

from .config import ServerConfig

__all__ = ["TokenAuthInterceptor", "UNAUTHENTICATED_MESSAGE", "check_certificate_dates", "read_token_file",
           "server_credentials"]

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token; pass the server's token (--token-file / FORVALUE_TOKEN)"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming on each side) that only aborts."""

    async def deny(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` metadata (health checks are exempt).

    The token is compared in constant time (`hmac.compare_digest`); the scheme name is case-insensitive.

    Args:
        token: the expected bearer token.
    """

    def __init__(self, token: str):
        if not token:
            raise ConfigError("token must not be empty; leave it None to turn authentication off")
        self._expected = token.encode()

    def authorized(self, metadata) -> bool:
        """Whether the call's invocation metadata carries the expected bearer token."""
        for key, value in metadata or ():
            if key != "authorization":
                continue
            value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected):
                return True
        return False

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _denied(handler)


def read_token_file(path: str) -> str:
    """The bearer token in a file, surrounding whitespace (a trailing newline) removed.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 text, or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot read it ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token file {path}: not UTF-8 text; put the token on one line") from exc
    if not token:
        raise ConfigError(f"token file {path}: is empty; put the token on one line")
    return token


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"tls_{what} {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"tls_{what} {path}: not a PEM file (no '-----BEGIN' line); give a PEM "
                          f"{'certificate (chain)' if what == 'cert' else 'private key'}")
    return data


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def check_certificate_dates(path: str, now: float | None = None) -> None:
    """Refuse a certificate (the first of a PEM chain: the server's own) outside its validity dates.

    Read with the standard library's certificate decoder (`ssl._ssl._test_decode_cert`, the one behind
    `ssl.SSLSocket.getpeercert`; there is no public file-level API and `cryptography` is not a dependency).

    Raises:
        ConfigError: expired, or not valid yet, naming the file and the dates.
    """
    try:
        decoded = ssl._ssl._test_decode_cert(path)
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (ssl.SSLError, ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"tls_cert {path}: cannot read its validity dates ({exc})") from exc
    now = time.time() if now is None else now
    if now > not_after:
        raise ConfigError(f"tls_cert {path}: expired on {_utc(not_after)} (now {_utc(now)}); give a renewed "
                          "certificate (--tls-cert) and its key (--tls-key)")
    if now < not_before:
        raise ConfigError(f"tls_cert {path}: not valid before {_utc(not_before)} (now {_utc(now)}); check this "
                          "machine's clock or give a certificate valid now")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS credentials of `config.tls_cert` and `config.tls_key` (None when TLS is off).

    Both files are checked here (with the standard `ssl` module), so a bad file stops the server at start
    instead of failing every handshake.

    Raises:
        ConfigError: a file cannot be read, is not PEM, the certificate does not parse, is expired or not valid
            yet, or the key does not parse (an encrypted key counts) or does not belong to the certificate; the
            message names the file.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read_pem(config.tls_cert, "cert")
    key = _read_pem(config.tls_key, "key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls_cert {config.tls_cert}: not a valid PEM certificate ({exc})") from exc
    check_certificate_dates(config.tls_cert)
    try:
        # a password callback, so an encrypted key fails here instead of prompting on the terminal
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"tls_key {config.tls_key}: not an unencrypted PEM private key of the certificate "
                          f"{config.tls_cert} ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"tls_key {config.tls_key}: cannot read it ({exc.strerror or exc})") from exc
    return grpc.ssl_server_credentials([(key, cert)])
