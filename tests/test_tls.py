"""SPEC §3: TLS and mutual TLS by configuration. The server reads TWOFACTOR_TLS_CERT_FILE and
TWOFACTOR_TLS_KEY_FILE (TLS) and TWOFACTOR_TLS_CLIENT_CA_FILE (clients must present a
certificate from that CA). A test CA issues the certificates; clients are stock gRPC channels.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2
from twofactor.v1 import enums_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from tests.support import TEST_ENCRYPTION_KEYS, Actors, health_status
from twofactor_service.config import ConfigError, load_config
from twofactor_service.runtime import Runtime
from twofactor_service.server import start_server

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None,
    build: Callable[[x509.CertificateBuilder], x509.CertificateBuilder],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return build(builder).sign(signer, hashes.SHA256())


def _new_ca(name: str) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(
        name,
        key,
        None,
        lambda b: b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        ),
    )  # fmt: skip
    return cert, key


def _issue(
    ca: tuple[x509.Certificate, Key], subject: str, *, server: bool
) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH

    def build(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b

    return _certificate(subject, key, ca, build), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    ca: bytes
    other_ca: bytes
    # (private key, certificate chain) of clients, as grpc.ssl_channel_credentials takes them.
    client: tuple[bytes, bytes]
    stranger: tuple[bytes, bytes]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA with a server and a client certificate, and a second CA nobody trusts, with a
    client certificate of its own."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = _new_ca("TwoFactorService test CA"), _new_ca("Someone else's CA")
    server_cert, server_key = _issue(ca, "twofactor-service", server=True)
    client_cert, client_key = _issue(ca, "console-backend", server=False)
    stranger_cert, stranger_key = _issue(other_ca, "console-backend", server=False)
    files = {
        "ca.pem": _pem(ca[0]),
        "server.pem": _pem(server_cert),
        "server.key": _key_pem(server_key),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Pki(
        ca_file=folder / "ca.pem",
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server.key",
        ca=_pem(ca[0]),
        other_ca=_pem(other_ca[0]),
        client=(_key_pem(client_key), _pem(client_cert)),
        stranger=(_key_pem(stranger_key), _pem(stranger_cert)),
    )


def _tls_env(pki: Pki, *, mutual: bool) -> dict[str, str]:
    env = {
        "TWOFACTOR_TLS_CERT_FILE": str(pki.server_cert_file),
        "TWOFACTOR_TLS_KEY_FILE": str(pki.server_key_file),
    }
    if mutual:
        env["TWOFACTOR_TLS_CLIENT_CA_FILE"] = str(pki.ca_file)
    return env


async def _serve(runtime: Runtime, env: dict[str, str]) -> AsyncIterator[str]:
    """The service with the TLS part of its configuration read from `env`; yields its address."""
    tls = load_config(env).tls
    assert tls is not None
    config = dataclasses.replace(runtime.config, tls=tls)
    running = await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(grace=1)


@pytest.fixture
async def tls_address(runtime: Runtime, pki: Pki) -> AsyncIterator[str]:
    async for address in _serve(runtime, _tls_env(pki, mutual=False)):
        yield address


@pytest.fixture
async def mtls_address(runtime: Runtime, pki: Pki) -> AsyncIterator[str]:
    async for address in _serve(runtime, _tls_env(pki, mutual=True)):
        yield address


def _secure(
    address: str, root: bytes, client: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    key, chain = client if client else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(address, credentials)


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status a call over `channel` ends with, expected to be a refusal."""
    async with channel:
        stub = pb_grpc.TwoFactorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.SignIn(pb.SignInRequest(username="nobody", password="pw"), timeout=3)
    code: grpc.StatusCode = failure.value.code()
    return code


async def _signs_in(channel: grpc.aio.Channel, actors: Actors) -> None:
    """A whole sign-in through `channel`: the health check, then password and code."""
    bob = await actors.user()
    async with channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.TwoFactorServiceStub(channel)
        response = await stub.SignIn(
            pb.SignInRequest(username=bob.username, password=bob.password, code=bob.next_code()),
            timeout=5,
        )
    assert response.outcome == enums_pb2.SIGN_IN_OUTCOME_SESSION_OPENED


async def test_tls_client_that_trusts_the_ca_can_call(
    tls_address: str, pki: Pki, actors: Actors
) -> None:
    await _signs_in(_secure(tls_address, pki.ca), actors)


async def test_tls_server_refuses_plaintext_and_is_not_trusted_without_its_ca(
    tls_address: str, pki: Pki
) -> None:
    assert await _refused(grpc.aio.insecure_channel(tls_address)) == grpc.StatusCode.UNAVAILABLE
    assert await _refused(_secure(tls_address, pki.other_ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_client_with_a_certificate_from_the_ca_can_call(
    mtls_address: str, pki: Pki, actors: Actors
) -> None:
    await _signs_in(_secure(mtls_address, pki.ca, pki.client), actors)


async def test_mtls_refuses_a_client_without_a_certificate(mtls_address: str, pki: Pki) -> None:
    assert await _refused(_secure(mtls_address, pki.ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_certificate_from_another_ca(
    mtls_address: str, pki: Pki
) -> None:
    channel = _secure(mtls_address, pki.ca, pki.stranger)
    assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_without_its_key_is_a_configuration_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="TWOFACTOR_TLS_KEY_FILE"):
        load_config({"TWOFACTOR_TLS_CERT_FILE": str(pki.server_cert_file)})


def test_a_client_ca_without_tls_is_a_configuration_error(pki: Pki) -> None:
    # Asked for mTLS but no server certificate: serving plaintext instead would be a silent
    # downgrade, so the configuration is refused.
    with pytest.raises(ConfigError, match="TWOFACTOR_TLS_CLIENT_CA_FILE"):
        load_config({"TWOFACTOR_TLS_CLIENT_CA_FILE": str(pki.ca_file)})


@pytest.mark.parametrize(
    ("broken", "variable"),
    [
        ("server_cert_file", "TWOFACTOR_TLS_CERT_FILE"),
        ("server_key_file", "TWOFACTOR_TLS_KEY_FILE"),
        ("ca_file", "TWOFACTOR_TLS_CLIENT_CA_FILE"),
    ],
)
async def test_a_file_that_is_not_pem_is_named_at_start(
    runtime: Runtime, pki: Pki, tmp_path: Path, broken: str, variable: str
) -> None:
    env = _tls_env(pki, mutual=True)
    not_pem = tmp_path / "not.pem"
    not_pem.write_bytes(b"this is not PEM")
    env[variable] = str(not_pem)
    config = dataclasses.replace(runtime.config, tls=load_config(env).tls)

    with pytest.raises(ConfigError, match=variable):
        await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)


async def test_a_key_that_does_not_match_the_certificate_is_refused_at_start(
    runtime: Runtime, pki: Pki, tmp_path: Path
) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    env = _tls_env(pki, mutual=False) | {"TWOFACTOR_TLS_KEY_FILE": str(other_key)}
    config = dataclasses.replace(runtime.config, tls=load_config(env).tls)

    with pytest.raises(ConfigError, match="TWOFACTOR_TLS_KEY_FILE"):
        await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)


def test_serve_names_a_missing_certificate_file(
    pki: Pki, database_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= _tls_env(pki, mutual=False) | {
        "TWOFACTOR_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
        # A complete configuration otherwise, so only the certificate can be at fault.
        "TWOFACTOR_DATABASE_URL": database_url,
        "TWOFACTOR_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,
        "TWOFACTOR_LISTEN_ADDRESS": "127.0.0.1:0",
        "TWOFACTOR_DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "twofactor_service.cli", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr  # the CLI's exit status for configuration errors
    assert "configuration error: TWOFACTOR_TLS_CERT_FILE" in done.stderr
    assert "missing.pem" in done.stderr


# --- The web console serves HTTPS with the same settings (TWOFACTOR_TLS_*).


async def test_the_console_needs_the_same_client_certificate_as_the_grpc_port(
    runtime: Runtime, pki: Pki, tmp_path: Path
) -> None:
    tls = load_config(_tls_env(pki, mutual=True)).tls
    config = dataclasses.replace(runtime.config, tls=tls)
    running = await start_server(config, runtime.pool, runtime.key_ring, runtime=runtime)
    try:
        assert running.console is not None
        url = running.console.url
        assert url.startswith("https://127.0.0.1:")
        key_file, chain_file = tmp_path / "client.key", tmp_path / "client.pem"
        key_file.write_bytes(pki.client[0])
        chain_file.write_bytes(pki.client[1])
        with_certificate = ssl.create_default_context(cadata=pki.ca.decode())
        with_certificate.load_cert_chain(chain_file, key_file)
        without_certificate = ssl.create_default_context(cadata=pki.ca.decode())
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=with_certificate) as response:
                assert response.status == 200
                assert response.headers["Strict-Transport-Security"].startswith("max-age=")
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, ssl=without_certificate) as response:
                    await response.read()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url.replace("https:", "http:")) as response:
                    await response.read()
    finally:
        await running.stop(grace=1)
