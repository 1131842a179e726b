"""Debian's rsyslog as the SIEM's receiver in the tests: its own rsyslogd process with a private
work directory, a plaintext TCP input and a TLS input (GnuTLS, on a test CA, asking for a client
certificate), each writing what it received to a file of its own, one JSON object a line: the
raw message, the header fields as rsyslog parsed them, and the structured data as rsyslog's
mmpstrucdata module parsed it (`make rsyslog` installs rsyslog and rsyslog-gnutls)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.replicas import free_port

START_WITHIN_SECONDS = 15.0
STOP_WITHIN_SECONDS = 15.0

Key = ec.EllipticCurvePrivateKey


def _rsyslogd() -> str:
    found = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    assert found, "rsyslogd is missing: run `make rsyslog`"
    return found


def _certificate(
    subject: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _ca(name: str) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return _certificate(
        name, key, None, [(x509.BasicConstraints(ca=True, path_length=None), True), (usage, True)]
    ), key


def _issue(ca: tuple[x509.Certificate, Key], subject: str, *, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        ),
    ]
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        extensions.append((x509.SubjectAlternativeName(names), False))
    cert = _certificate(subject, key, ca, extensions)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True)
class TestPki:
    """A test CA, the receiver's certificate from it, a client certificate from it, and a CA
    nobody uses (for a receiver that is not trusted)."""

    __test__ = False

    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path
    other_ca_file: Path


def make_pki(folder: Path) -> TestPki:
    ca = _ca("SIEM test CA")
    files = {
        "ca.pem": ca[0].public_bytes(serialization.Encoding.PEM),
        "other-ca.pem": _ca("Someone else's CA")[0].public_bytes(serialization.Encoding.PEM),
    }
    files["server.pem"], files["server.key"] = _issue(ca, "siem.test", server=True)
    files["client.pem"], files["client.key"] = _issue(ca, "twofactor-exporter", server=False)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return TestPki(
        ca_file=folder / "ca.pem",
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server.key",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        other_ca_file=folder / "other-ca.pem",
    )


_CONFIG = """
global(
    workDirectory="{work}"
    maxMessageSize="64k"
    defaultNetstreamDriverCAFile="{pki.ca_file}"
    defaultNetstreamDriverCertFile="{pki.server_cert_file}"
    defaultNetstreamDriverKeyFile="{pki.server_key_file}"
)
module(load="imtcp")
module(load="mmpstrucdata")

template(name="event" type="list" option.jsonf="on") {{
    property(outname="raw" name="rawmsg" format="jsonf")
    property(outname="pri" name="pri" format="jsonf")
    property(outname="timestamp" name="timestamp" dateFormat="rfc3339" format="jsonf")
    property(outname="received_at" name="timegenerated" dateFormat="rfc3339" format="jsonf")
    property(outname="hostname" name="hostname" format="jsonf")
    property(outname="app_name" name="app-name" format="jsonf")
    property(outname="msgid" name="msgid" format="jsonf")
    property(outname="msg" name="msg" format="jsonf")
    property(outname="sd" name="$!rfc5424-sd" format="jsonf")
}}

ruleset(name="tcp") {{
    action(type="mmpstrucdata" sd_name.lowercase="off")
    action(type="omfile" file="{work}/tcp.jsonl" template="event")
}}
ruleset(name="tls") {{
    action(type="mmpstrucdata" sd_name.lowercase="off")
    action(type="omfile" file="{work}/tls.jsonl" template="event")
}}

input(type="imtcp" address="127.0.0.1" port="{tcp_port}" ruleset="tcp")
input(type="imtcp" address="127.0.0.1" port="{tls_port}" ruleset="tls"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
"""


class Rsyslog:
    """rsyslogd in the foreground (`-n`), its own configuration, pid file and work folder."""

    def __init__(self, folder: Path, pki: TestPki) -> None:
        self.folder = folder
        self.pki = pki
        self.tcp_port = free_port()
        self.tls_port = free_port()
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            _CONFIG.format(work=folder, pki=pki, tcp_port=self.tcp_port, tls_port=self.tls_port)
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    @property
    def tls_address(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        assert self.process is None
        self.starts += 1
        with (self.folder / f"rsyslogd-{self.starts}.log").open("wb") as sink:
            self.process = subprocess.Popen(  # noqa: S603 - our own command line
                [_rsyslogd(), "-n", "-f", str(self.config), "-i", str(self.folder / "pid")],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_WITHIN_SECONDS
        while not all(_listening(port) for port in (self.tcp_port, self.tls_port)):
            if self.process.poll() is not None:
                raise AssertionError(f"rsyslogd exited: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"rsyslogd not listening within {START_WITHIN_SECONDS} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, as an operator stops the receiver."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_WITHIN_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.folder.glob("rsyslogd-*.log"))
        )

    def received(self, transport: str) -> list[dict[str, Any]]:
        """Every message the `transport` ("tcp" or "tls") input wrote out so far, in order."""
        path = self.folder / f"{transport}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        # The last line may be half written.
        return [json.loads(line) for line in lines if line.endswith("}")]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
