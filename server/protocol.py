"""The service protocol's generated modules, generated first when missing or stale (see `proto_gen`).

    from forvalue.server.protocol import pb, pb_grpc   # messages; stubs and servicer base class
"""

from __future__ import annotations

from .proto_gen import ensure_generated

ensure_generated()

from .generated import influence_pb2 as pb  # noqa: E402
from .generated import influence_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Influence"].full_name  # "forvalue.v1.Influence"
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InfluenceAdmin"].full_name  # "forvalue.v1.InfluenceAdmin"

__all__ = ["pb", "pb_grpc", "SERVICE_NAME", "ADMIN_SERVICE_NAME"]
