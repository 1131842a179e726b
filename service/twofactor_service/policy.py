"""Reads each RPC's access policy from the proto's custom options, once, at start.

The proto is the single place that says which right an RPC needs, whether the actor must
have 2FA, and which request field names the target account; nothing else lists them.
"""

from __future__ import annotations

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from twofactor.v1 import options_pb2, twofactor_service_pb2

from twofactor_service.rules import MethodPolicy

SERVICE: ServiceDescriptor = twofactor_service_pb2.DESCRIPTOR.services_by_name["TwoFactorService"]


class MissingPolicy(Exception):
    pass


def _target_field(method: MethodDescriptor) -> str | None:
    marked = [
        f.name
        for f in method.input_type.fields
        if f.GetOptions().Extensions[options_pb2.target_account]
    ]
    if len(marked) > 1:
        raise MissingPolicy(f"{method.full_name}: more than one target_account field")
    return marked[0] if marked else None


def method_policy(method: MethodDescriptor) -> MethodPolicy:
    options = method.GetOptions()
    if not options.HasExtension(options_pb2.access_policy):
        raise MissingPolicy(f"{method.full_name} declares no (twofactor.v1.access_policy)")
    declared = options.Extensions[options_pb2.access_policy]
    right = None
    if declared.HasField("required_right"):
        right = (declared.required_right.functional_area, declared.required_right.permission)
    return MethodPolicy(
        allow_anonymous=declared.allow_anonymous,
        required_right=right,
        require_two_factor=declared.require_two_factor,
        allow_self_without_right=declared.allow_self_without_right,
        protects_target=declared.protects_target,
        protects_targets_in_payload=declared.protects_targets_in_payload,
        target_field=_target_field(method),
        request_type=method.input_type.full_name,
    )


def load_policies(service: ServiceDescriptor = SERVICE) -> dict[str, MethodPolicy]:
    """Policies keyed by the gRPC method path, e.g. "/twofactor.v1.TwoFactorService/ResetSecret"."""
    return {f"/{service.full_name}/{m.name}": method_policy(m) for m in service.methods}
