"""forvalue.server: the gRPC influence service."""
