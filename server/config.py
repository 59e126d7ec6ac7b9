"""The server's configuration: what it serves and the limits it enforces on requests."""

from __future__ import annotations

from dataclasses import dataclass

from forvalue.indexer.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How the influence service runs; change it with `dataclasses.replace`.

    Attributes:
        index_dir: index directory; its CURRENT version is served.
        model_path: the model the index was built with (HF directory or .gguf); None = the default model.
        device: torch device of the forward pass.
        k_cap: largest k a TopK request may ask for.
        default_rerank: first-stage candidates scored exactly when a request says rerank = 0.
        max_rerank: largest rerank a request may ask for.
        max_samples: most valuation samples in one request.
        default_chunk: ScoreAll rows per chunk when a request says chunk_size = 0.
        max_chunk: largest chunk_size a ScoreAll request may ask for.
        max_message_bytes: largest request or response message.
        max_queue: calls in flight beyond which a new call is answered RESOURCE_EXHAUSTED at once (grpc's
            maximum_concurrent_rpcs); None = no limit.
        reflection: serve gRPC server reflection (for grpcurl, grpc_cli).
        grace_seconds: on SIGTERM, how long in-flight calls may take to finish.

    Raises:
        ConfigError: a field is out of range.
    """

    index_dir: str
    model_path: str | None = None
    device: str = "cpu"
    k_cap: int = 1000
    default_rerank: int = 100
    max_rerank: int = 10_000
    max_samples: int = 256
    default_chunk: int = 4096
    max_chunk: int = 65_536
    max_message_bytes: int = 64 * 1024 * 1024
    max_queue: int | None = None
    reflection: bool = True
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("k_cap", "default_rerank", "max_rerank", "max_samples", "default_chunk", "max_chunk",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1 or None, got {self.max_queue}")
        if self.max_rerank < self.default_rerank:
            raise ConfigError(f"max_rerank ({self.max_rerank}) must be >= default_rerank ({self.default_rerank})")
        if self.max_chunk < self.default_chunk:
            raise ConfigError(f"max_chunk ({self.max_chunk}) must be >= default_chunk ({self.default_chunk})")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
