"""Service identity over mTLS: a backend that calls with a client certificate the server
verified (TWOFACTOR_TLS_CLIENT_CA_FILE) can be mapped, by configuration, to the service account
it calls as (TWOFACTOR_CLIENT_CERTIFICATE_ACCOUNTS), and then needs no session.

A certificate is known by its URI subject alternative names (a SPIFFE id,
`spiffe://example.org/ns/prod/sa/billing`) and by its subject's common name (`CN=billing`), as
gRPC's auth context reports them after verifying the chain: nothing the client sends in
metadata counts.
"""

from __future__ import annotations

from typing import Any

import grpc


def certificate_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The verified client certificate's names, URI SANs first; none without one."""
    properties = context.auth_context() or {}
    names = [
        value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        for value in properties.get("x509_subject_alternative_name", ())
    ]
    identities = [name for name in names if "://" in name]
    for common_name in properties.get("x509_common_name", ()):
        text = common_name.decode("utf-8", "replace") if isinstance(common_name, bytes) else ""
        identities.append(f"CN={text}")
    return identities


def mapped_account(
    context: grpc.aio.ServicerContext[Any, Any], accounts: dict[str, str]
) -> str | None:
    """The service account the caller's certificate is mapped to, if any."""
    if not accounts:
        return None
    for identity in certificate_identities(context):
        if identity in accounts:
            return accounts[identity]
    return None
