"""gRPC server reflection, as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection (1.85) implements only v1alpha (grpc/grpc#38576 asks for v1). The v1 protocol
is v1alpha promoted unchanged: the same messages, fields and numbers under the package
`grpc.reflection.v1`, and none of its fields names a message type. So the package's servicer
answers both: v1alpha through the package's own registration, v1 through a generic handler for
`grpc.reflection.v1.ServerReflection/ServerReflectionInfo` that (de)serializes with the
v1alpha message classes, byte for byte what v1 clients send and expect. Tools that try v1
first (grpcurl, grpcui, Postman, buf curl) find it; older ones still find v1alpha.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves reflection for `service_names` and for both reflection services themselves."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    v1_info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_info}),)
    )
