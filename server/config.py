"""The server's configuration: what it serves and the limits it enforces on requests."""

from __future__ import annotations

from dataclasses import dataclass, field

from forvalue.indexer.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How the influence service runs; change it with `dataclasses.replace`.

    Attributes:
        index_dir: index directory; its CURRENT version is served.
        model_path: the model the index was built with (HF directory or .gguf); None = the default model.
        device: torch device of the forward pass.
        dtype: precision of the forward pass ("auto": bfloat16 on a GPU, float32 on a CPU; see model.load_model).
        k_cap: largest k a TopK request may ask for.
        default_rerank: first-stage candidates scored exactly when a request says rerank = 0.
        max_rerank: largest rerank a request may ask for.
        max_samples: most valuation samples in one request.
        max_sample_chars: most characters in a valuation sample's prompt, and in its response; a longer one
            is answered INVALID_ARGUMENT naming the field, before any tokenizing.
        default_chunk: ScoreAll rows per chunk when a request says chunk_size = 0.
        max_chunk: largest chunk_size a ScoreAll request may ask for.
        default_explain_pairs: top token pairs per hit of an explained TopK answer when a request says
            explain_pairs = 0.
        max_explain_pairs: largest explain_pairs a TopK request may ask for.
        max_message_bytes: largest request or response message. A TopK reply estimated above it is refused
            RESOURCE_EXHAUSTED before any work; one that turns out above it, after.
        max_request_tokens: estimated tokens (about 4 characters each) of one request's valuation samples.
        max_answer_hits: hits one TopK request may ask for: answers (1, or one per sample when not grouped,
            times the directions) × k.
        max_explained_hits: hits with a token-level explanation one TopK request may ask for.
        max_queue: TopK and ScoreAll requests waiting for or in the model beyond which a new one is answered
            RESOURCE_EXHAUSTED at once (health checks and Info always answer; a client retries later). None =
            no limit (then only deadlines bound the wait).
        batch_wait_ms: how long the oldest waiting TopK request may wait for others to share its forward
            pass (0 = no wait: a batch takes only what is already waiting).
        batch_tokens: estimated tokens (prompt + response, about 4 characters each) beyond which no more
            requests join a batch; a single larger request still runs alone.
        max_batch_requests: most TopK requests in one shared forward pass (1 = no batching).
        watch_seconds: how often CURRENT is checked for a new index version to load and serve without a
            restart (0 = never; `InfluenceServer.reload()` still checks on demand).
        reflection: serve gRPC server reflection (for grpcurl, grpc_cli).
        grace_seconds: on SIGTERM, how long in-flight calls may take to finish.
        token: the bearer token every call but health checks must carry (`authorization: Bearer <token>`);
            None = no authentication. Kept out of repr so it stays out of logs.
        tls_cert: PEM certificate (chain) of the server; with tls_key, TLS is on. None = plaintext.
        tls_key: PEM private key (unencrypted) of tls_cert.
        metrics_port: port of the Prometheus HTTP endpoint (/metrics); 0 picks a free port
            (`InfluenceServer.metrics_port`); None = no endpoint. With `token` set, a scrape must send it
            (`Authorization: Bearer <token>`), else 401.
        metrics_host: address the metrics endpoint listens on; loopback by default, whatever the gRPC host.
        metrics_max_connections: metrics connections handled at once (one worker thread each); more are
            closed at once.
        metrics_idle_seconds: a metrics connection idle this long is closed.
        admin: serve the InfluenceAdmin service (Delete: takedowns publish a new version, then served);
            off by default (its calls then get UNIMPLEMENTED). Guard it with a token.

    Raises:
        ConfigError: a field is out of range.
    """

    index_dir: str
    model_path: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    k_cap: int = 1000
    default_rerank: int = 100
    max_rerank: int = 10_000
    max_samples: int = 256
    max_sample_chars: int = 100_000
    default_chunk: int = 4096
    max_chunk: int = 65_536
    default_explain_pairs: int = 10
    max_explain_pairs: int = 100
    max_message_bytes: int = 64 * 1024 * 1024
    max_request_tokens: int = 262_144
    max_answer_hits: int = 20_000
    max_explained_hits: int = 1_000
    max_queue: int | None = 1024
    batch_wait_ms: float = 5.0
    batch_tokens: int = 16_384
    max_batch_requests: int = 64
    watch_seconds: float = 2.0
    reflection: bool = True
    grace_seconds: float = 10.0
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_max_connections: int = 8
    metrics_idle_seconds: float = 10.0
    admin: bool = False

    def __post_init__(self) -> None:
        for name in ("k_cap", "default_rerank", "max_rerank", "max_samples", "max_sample_chars", "default_chunk",
                     "max_chunk", "max_message_bytes", "max_request_tokens", "max_answer_hits",
                     "max_explained_hits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1 or None, got {self.max_queue}")
        for name in ("batch_tokens", "max_batch_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms <= 60_000:
            raise ConfigError(f"batch_wait_ms must be between 0 and 60000, got {self.batch_wait_ms}")
        if not 0 <= self.watch_seconds < float("inf"):
            raise ConfigError(f"watch_seconds must be >= 0 (0 = do not watch CURRENT), got {self.watch_seconds}")
        if self.max_rerank < self.default_rerank:
            raise ConfigError(f"max_rerank ({self.max_rerank}) must be >= default_rerank ({self.default_rerank})")
        if self.max_chunk < self.default_chunk:
            raise ConfigError(f"max_chunk ({self.max_chunk}) must be >= default_chunk ({self.default_chunk})")
        if not 1 <= self.default_explain_pairs <= self.max_explain_pairs:
            raise ConfigError(f"default_explain_pairs ({self.default_explain_pairs}) must be between 1 and "
                              f"max_explain_pairs ({self.max_explain_pairs})")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be between 0 and 65535 (None: no endpoint), got {self.metrics_port}")
        if self.metrics_max_connections < 1:
            raise ConfigError(f"metrics_max_connections must be >= 1, got {self.metrics_max_connections}")
        if not 0 < self.metrics_idle_seconds < float("inf"):
            raise ConfigError(f"metrics_idle_seconds must be > 0, got {self.metrics_idle_seconds}")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.token is not None and (not self.token or any(not "!" <= c <= "~" for c in self.token)):
            raise ConfigError("token must be non-empty printable ASCII without spaces (None turns authentication "
                              "off); make one with `python -c 'import secrets; print(secrets.token_urlsafe())'`")
        for given, missing in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
            if getattr(self, given) is not None and getattr(self, missing) is None:
                raise ConfigError(f"{missing} is missing: {given} is set, and TLS needs both the certificate and "
                                  f"its private key (--tls-cert, --tls-key); give both, or neither for plaintext")
