"""forvalue.server: the gRPC influence service (`app.create_server`, `app.serve`).

The protocol's Python modules are generated from proto/forvalue/v1 on first import of
`forvalue.server.protocol` (see `proto_gen`).
"""
