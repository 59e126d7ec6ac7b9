"""forvalue.server: the gRPC influence service.

`app.create_server` / `app.serve` run `servicer.InfluenceServicer` (validate → library call → protobuf;
converters in convert.py, the exception → status mapping in status.py) over a loaded `Index`, with dynamic
batching of concurrent queries into shared forward passes (batching.py), bearer tokens and TLS
(security.py), Prometheus metrics (metrics.py) and a shard router (router.py). The protocol's Python modules
are generated from proto/forvalue/v1 on first import of `forvalue.server.protocol` (proto_gen.py).
"""
