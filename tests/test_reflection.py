"""Server reflection, so grpcurl and similar tools need no .proto files: both the current
protocol, grpc.reflection.v1, and its predecessor v1alpha, which older tools still use."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from grpclib.client import Channel
from grpclib.reflection.v1 import reflection_pb2 as v1
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub

from twofactor_service.server import RunningServer

SERVICE = "twofactor.v1.TwoFactorService"
EXPECTED_SERVICES = {
    SERVICE,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _services_in(file_descriptors: list[bytes]) -> set[str]:
    names = set()
    for serialized in file_descriptors:
        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        names |= {f"{proto.package}.{service.name}" for service in proto.service}
    return names


async def test_a_v1_reflection_client_lists_and_describes_the_service(
    server: RunningServer,
) -> None:
    """grpclib's client, generated from grpc/reflection/v1/reflection.proto: another gRPC
    implementation speaking v1 only."""
    async with Channel("127.0.0.1", server.port) as channel:
        stub = ServerReflectionStub(channel)
        listed, described = await stub.ServerReflectionInfo(
            [
                v1.ServerReflectionRequest(list_services=""),
                v1.ServerReflectionRequest(file_containing_symbol=SERVICE),
            ]
        )

    assert {s.name for s in listed.list_services_response.service} == EXPECTED_SERVICES
    files = list(described.file_descriptor_response.file_descriptor_proto)
    assert SERVICE in _services_in(files)


async def test_a_v1alpha_reflection_client_lists_and_describes_the_service(
    server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # The typeshed stub types it for a sync channel; it works on an aio channel too.
        stub: Any = v1alpha_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        call = stub.ServerReflectionInfo(
            iter(
                [
                    v1alpha.ServerReflectionRequest(list_services=""),
                    v1alpha.ServerReflectionRequest(file_containing_symbol=SERVICE),
                ]
            )
        )
        listed, described = [response async for response in call]

    assert {s.name for s in listed.list_services_response.service} == EXPECTED_SERVICES
    files = list(described.file_descriptor_response.file_descriptor_proto)
    assert SERVICE in _services_in(files)
