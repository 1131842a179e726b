"""Configuration: read once at start from the `TWOFACTOR_*` environment into a frozen object."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "TWOFACTOR_"


# OWASP's minimum for argon2id (Password Storage Cheat Sheet): 19 MiB and 2 passes.
MIN_HASH_MEMORY_KIB = 19456
MIN_HASH_PASSES = 2


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class TotpParameters:
    """RFC 6238 parameters of newly made keys (existing keys keep their own)."""

    algorithm: str = "SHA1"
    digits: int = 6
    period_seconds: int = 30
    # Steps accepted before and after the current one (clock drift tolerance).
    valid_window: int = 1
    # 160-bit secrets, RFC 4226 R6.
    secret_bytes: int = 20


@dataclass(frozen=True)
class LockoutPolicy:
    """Consecutive failures allowed free, then a lockout that doubles up to a cap."""

    free_failures: int = 5
    first_delay_seconds: int = 30
    max_delay_seconds: int = 900
    # A count with no attempt for this long is forgotten (accounts and unknown names alike).
    forget_after_seconds: int = 86400
    # Counters of names that are not accounts: at most this many rows (store/attempts.py).
    unknown_name_buckets: int = 65536


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    # When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class SiemConfig:
    """Where and how audit events are exported to a SIEM over syslog (siem_export.py)."""

    host: str
    port: int
    # "tls" (RFC 5425) or "tcp" (RFC 6587 octet counting, plaintext).
    transport: str = "tls"
    # The receiver's CA (PEM); unset: the system's trust store. TLS only.
    ca_file: Path | None = None
    # A client certificate (PEM chain) and its unencrypted key, for receivers that ask. TLS only.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    # "rfc5424" (structured data) or "cef" (ArcSight Common Event Format in the syslog MSG).
    format: str = "rfc5424"
    app_name: str = "twofactor"
    hostname: str = "-"


@dataclass(frozen=True)
class ConsoleLimits:
    """The web console's HTTP front door (console/front_door.py): every read of the network has
    a deadline, and connections are capped, so an anonymous client cannot hold its resources."""

    # From a request's first byte to the end of its head (request line and headers).
    header_timeout_seconds: float = 10
    # From the end of the head to the end of the body.
    body_timeout_seconds: float = 10
    # An open connection with no request in it is closed after this long.
    idle_timeout_seconds: float = 30
    # Connections open at once (per console process); more are answered 503 and closed.
    max_connections: int = 100
    # Host names (or IP literals) the console answers to; empty: the bound address and the
    # loopback names (console/front_door.py, allowed_hosts).
    hosts: tuple[str, ...] = ()
    # The console process's CPU class: "idle" (SCHED_IDLE: it runs only on CPU time no other
    # task wants) or "batch" (SCHED_BATCH at nice 10). Either way the gRPC server wins.
    cpu_class: str = "idle"


@dataclass(frozen=True)
class Config:
    listen_address: str = "127.0.0.1:50051"
    # None: start the embedded PostgreSQL in `data_dir`.
    database_url: str | None = None
    data_dir: Path = Path(".data")
    database_pool_size: int = 10
    issuer_name: str = "TwoFactorService"
    totp: TotpParameters = field(default_factory=TotpParameters)
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    pending_key_ttl_seconds: int = 600
    enrollment_ticket_ttl_seconds: int = 600
    # Recovery codes made by one GenerateRecoveryCodes (recovery_codes.py).
    recovery_codes_per_set: int = 10
    session_ttl_seconds: int = 8 * 3600
    session_idle_seconds: int = 30 * 60
    # "kid:base64key,kid2:base64key": the first encrypts new secrets, all decrypt.
    encryption_keys: str | None = None
    encryption_key_file: Path | None = None
    metrics_address: str | None = None
    # The web console (console/): HTTP, or HTTPS with `tls`; None turns it off.
    console_address: str | None = "127.0.0.1:8080"
    console_limits: ConsoleLimits = field(default_factory=ConsoleLimits)
    log_level: str = "INFO"
    tls: TlsConfig | None = None
    max_message_bytes: int = 64 * 1024
    workers: int = 1
    # argon2 evaluations at once in this process, and how many more may wait for one; past
    # that a password check is refused at once (RESOURCE_EXHAUSTED, PASSWORD_CHECKS_BUSY).
    password_checks: int = field(default_factory=lambda: os.cpu_count() or 1)
    password_check_queue: int = 16
    # argon2id's cost for new password hashes: RFC 9106's second recommended option by default
    # (64 MiB, 3 passes, 4 lanes); no lower than OWASP's minimum (19 MiB, 2 passes). Existing
    # hashes keep the cost they were made with (it is written in each hash).
    password_hash_memory_kib: int = 65536
    password_hash_passes: int = 3
    # VerifyCode batches at the database at once (verification.py); calls arriving meanwhile
    # gather for the next batch.
    verify_batches_in_flight: int = 1
    # How long a resolved caller may be reused without asking PostgreSQL again, at most
    # (transport/identities.py: changes are heard at once; this bounds the worst case).
    identity_cache_seconds: int = 2
    # mTLS: client certificate identities (a URI SAN such as a SPIFFE id, or "CN=<name>") and
    # the service account each one calls as, without a session (transport/client_certificates.py).
    client_certificate_accounts: tuple[tuple[str, str], ...] = ()
    # OpenTelemetry tracing over OTLP/gRPC (tracing.py); the standard OTEL_* variables turn it
    # on, and the SDK reads the rest of them (endpoint, headers, sampler, batching) itself.
    tracing: bool = False
    # Audit export over syslog; None (TWOFACTOR_SIEM_ADDRESS unset) turns it off.
    siem: SiemConfig | None = None

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{PREFIX}{name} must be between {low} and {high}, got {value}")
    return value


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(PREFIX + name)
    return Path(raw) if raw else None


def _certificate_accounts(raw: str | None) -> tuple[tuple[str, str], ...]:
    """ "identity=account,identity=account"; the account is what follows the last "="."""
    pairs = []
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        identity, sep, account = item.strip().rpartition("=")
        if not sep or not identity or not account:
            raise ConfigError(
                f"{PREFIX}CLIENT_CERTIFICATE_ACCOUNTS: {item.strip()!r} is not identity=account "
                "(identity: a URI SAN such as spiffe://example.org/backend, or CN=<name>)"
            )
        pairs.append((identity, account))
    return tuple(pairs)


def _console_address(env: Mapping[str, str]) -> str | None:
    """host:port of the web console; an empty value turns it off."""
    raw = env.get(PREFIX + "CONSOLE_ADDRESS", "127.0.0.1:8080")
    if raw == "":
        return None
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"{PREFIX}CONSOLE_ADDRESS must be host:port (empty turns the console off), got {raw!r}"
        )
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def _tracing(env: Mapping[str, str]) -> bool:
    """Whether to export traces. Off by default, unlike the OpenTelemetry SDK's own default
    (OTEL_TRACES_EXPORTER=otlp): on when OTEL_TRACES_EXPORTER is "otlp", or is unset while an
    OTLP endpoint is configured; never while OTEL_SDK_DISABLED is true. Only the OTLP/gRPC
    exporter is installed, so another exporter or protocol is refused, not silently ignored."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter not in ("", "otlp", "none"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
    if _flag(env, "OTEL_SDK_DISABLED") or exporter == "none":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not (exporter == "otlp" or endpoint):
        return False
    name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    if not env.get(name):
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = env.get(name, "").strip().lower()
    if protocol not in ("", "grpc"):
        raise ConfigError(f"{name}: only grpc (OTLP over gRPC) is supported, got {protocol!r}")
    return True


_SIEM_VARIABLES = (
    "SIEM_TRANSPORT",
    "SIEM_CA_FILE",
    "SIEM_CLIENT_CERT_FILE",
    "SIEM_CLIENT_KEY_FILE",
    "SIEM_FORMAT",
    "SIEM_APP_NAME",
    "SIEM_HOSTNAME",
)


def _syslog_name(env: Mapping[str, str], name: str, default: str, longest: int) -> str:
    """An RFC 5424 header field: 1 to `longest` printable US-ASCII characters, no space; a
    default that is none (an odd host name) becomes the NILVALUE "-"."""
    raw = env.get(PREFIX + name)
    if not raw:
        fits = 1 <= len(default) <= longest and all(33 <= ord(c) <= 126 for c in default)
        return default if fits else "-"
    if not 1 <= len(raw) <= longest or not all(33 <= ord(c) <= 126 for c in raw):
        raise ConfigError(
            f"{PREFIX}{name} must be 1 to {longest} printable ASCII characters without spaces, "
            f"got {raw!r}"
        )
    return raw


def _siem(env: Mapping[str, str]) -> SiemConfig | None:
    """TWOFACTOR_SIEM_*: export is on when TWOFACTOR_SIEM_ADDRESS is set."""
    address = env.get(PREFIX + "SIEM_ADDRESS", "")
    if not address:
        stray = [PREFIX + name for name in _SIEM_VARIABLES if env.get(PREFIX + name)]
        if stray:
            raise ConfigError(f"{', '.join(stray)} needs {PREFIX}SIEM_ADDRESS (host:port)")
        return None
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{PREFIX}SIEM_ADDRESS must be host:port, got {address!r}")
    transport = env.get(PREFIX + "SIEM_TRANSPORT", "tls").lower()
    if transport not in ("tls", "tcp"):
        raise ConfigError(f"{PREFIX}SIEM_TRANSPORT must be tls or tcp, got {transport!r}")
    siem_format = env.get(PREFIX + "SIEM_FORMAT", "rfc5424").lower()
    if siem_format not in ("rfc5424", "cef"):
        raise ConfigError(f"{PREFIX}SIEM_FORMAT must be rfc5424 or cef, got {siem_format!r}")
    files = {
        name: _path(env, name)
        for name in ("SIEM_CA_FILE", "SIEM_CLIENT_CERT_FILE", "SIEM_CLIENT_KEY_FILE")
    }
    for name, path in files.items():
        if path is None:
            continue
        if transport != "tls":
            # A CA or a client certificate with plaintext would be a silent downgrade.
            raise ConfigError(f"{PREFIX}{name} needs {PREFIX}SIEM_TRANSPORT=tls")
        if not path.is_file():
            raise ConfigError(f"{PREFIX}{name}: no such file {str(path)!r}")
    cert, key = files["SIEM_CLIENT_CERT_FILE"], files["SIEM_CLIENT_KEY_FILE"]
    if bool(cert) != bool(key):
        raise ConfigError(
            f"{PREFIX}SIEM_CLIENT_CERT_FILE and {PREFIX}SIEM_CLIENT_KEY_FILE go together"
        )
    return SiemConfig(
        host=host,
        port=int(port),
        transport=transport,
        ca_file=files["SIEM_CA_FILE"],
        client_cert_file=cert,
        client_key_file=key,
        format=siem_format,
        # RFC 5424 section 6.2: APP-NAME up to 48 characters, HOSTNAME up to 255.
        app_name=_syslog_name(env, "SIEM_APP_NAME", "twofactor", 48),
        hostname=_syslog_name(env, "SIEM_HOSTNAME", socket.gethostname() or "-", 255),
    )


# RFC 1123 host names, ASCII only (an IDN is given in its xn-- form).
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _console_hosts(raw: str | None) -> tuple[str, ...]:
    """ "name,name,…": the Host names the console answers to (no port, no scheme)."""
    hosts: list[str] = []
    for item in (raw or "").split(","):
        name = item.strip().lower().rstrip(".")
        if not name:
            continue
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        try:
            hosts.append(str(ipaddress.ip_address(bare)))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(
                f"{PREFIX}CONSOLE_HOSTS: {item.strip()!r} is not a host name or an IP address "
                "(give names without a port or scheme, separated by commas)"
            )
        hosts.append(name)
    return tuple(hosts)


def _console_cpu_class(env: Mapping[str, str]) -> str:
    raw = env.get(PREFIX + "CONSOLE_CPU_CLASS", "idle").strip().lower() or "idle"
    if raw not in ("idle", "batch"):
        raise ConfigError(f"{PREFIX}CONSOLE_CPU_CLASS must be idle or batch, got {raw!r}")
    return raw


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Builds the configuration from the environment; raises ConfigError naming the variable."""
    env = os.environ if env is None else env
    algorithm = env.get(PREFIX + "TOTP_ALGORITHM", "SHA1").upper()
    if algorithm not in ("SHA1", "SHA256", "SHA512"):
        raise ConfigError(
            f"{PREFIX}TOTP_ALGORITHM must be SHA1, SHA256 or SHA512, got {algorithm!r}"
        )
    totp = TotpParameters(
        algorithm=algorithm,
        digits=_int(env, "TOTP_DIGITS", 6, 6, 8),
        period_seconds=_int(env, "TOTP_PERIOD_SECONDS", 30, 15, 120),
        valid_window=_int(env, "TOTP_VALID_WINDOW", 1, 0, 3),
    )
    lockout = LockoutPolicy(
        free_failures=_int(env, "LOCKOUT_FREE_FAILURES", 5, 1, 20),
        first_delay_seconds=_int(env, "LOCKOUT_FIRST_DELAY_SECONDS", 30, 1, 3600),
        max_delay_seconds=_int(env, "LOCKOUT_MAX_DELAY_SECONDS", 900, 1, 86400),
        forget_after_seconds=_int(env, "LOCKOUT_FORGET_AFTER_SECONDS", 86400, 3600, 30 * 86400),
        unknown_name_buckets=_int(env, "UNKNOWN_NAME_BUCKETS", 65536, 16, 1 << 24),
    )
    tls = None
    cert, key = _path(env, "TLS_CERT_FILE"), _path(env, "TLS_KEY_FILE")
    client_ca = _path(env, "TLS_CLIENT_CA_FILE")
    if cert or key:
        if not (cert and key):
            raise ConfigError(f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE go together")
        tls = TlsConfig(cert, key, client_ca)
    elif client_ca:
        # Serving plaintext when mTLS was asked for would be a silent downgrade.
        raise ConfigError(
            f"{PREFIX}TLS_CLIENT_CA_FILE needs {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE"
        )
    certificate_accounts = _certificate_accounts(env.get(PREFIX + "CLIENT_CERTIFICATE_ACCOUNTS"))
    if certificate_accounts and not client_ca:
        raise ConfigError(
            f"{PREFIX}CLIENT_CERTIFICATE_ACCOUNTS needs {PREFIX}TLS_CLIENT_CA_FILE: without mTLS "
            "no client certificate is verified"
        )
    tls_files = {"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key, "TLS_CLIENT_CA_FILE": client_ca}
    for name, path in tls_files.items():
        # Checked now, so a wrong path is reported as such and before the database is touched.
        if path is not None and not path.is_file():
            raise ConfigError(f"{PREFIX}{name}: no such file {str(path)!r}")
    log_level = env.get(PREFIX + "LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    issuer = env.get(PREFIX + "ISSUER_NAME", "TwoFactorService")
    return Config(
        listen_address=env.get(PREFIX + "LISTEN_ADDRESS", "127.0.0.1:50051"),
        database_url=env.get(PREFIX + "DATABASE_URL") or None,
        data_dir=_path(env, "DATA_DIR") or Path(".data"),
        database_pool_size=_int(env, "DATABASE_POOL_SIZE", 10, 1, 200),
        issuer_name=issuer,
        totp=totp,
        lockout=lockout,
        recovery_codes_per_set=_int(env, "RECOVERY_CODES_PER_SET", 10, 1, 100),
        session_ttl_seconds=_int(env, "SESSION_TTL_SECONDS", 8 * 3600, 60, 30 * 86400),
        session_idle_seconds=_int(env, "SESSION_IDLE_SECONDS", 30 * 60, 60, 30 * 86400),
        encryption_keys=env.get(PREFIX + "ENCRYPTION_KEYS") or None,
        encryption_key_file=_path(env, "ENCRYPTION_KEY_FILE"),
        metrics_address=env.get(PREFIX + "METRICS_ADDRESS") or None,
        console_address=_console_address(env),
        console_limits=ConsoleLimits(
            header_timeout_seconds=_int(env, "CONSOLE_HEADER_TIMEOUT_SECONDS", 10, 1, 300),
            body_timeout_seconds=_int(env, "CONSOLE_BODY_TIMEOUT_SECONDS", 10, 1, 300),
            idle_timeout_seconds=_int(env, "CONSOLE_IDLE_TIMEOUT_SECONDS", 30, 1, 3600),
            max_connections=_int(env, "CONSOLE_MAX_CONNECTIONS", 100, 1, 10_000),
            hosts=_console_hosts(env.get(PREFIX + "CONSOLE_HOSTS")),
            cpu_class=_console_cpu_class(env),
        ),
        log_level=log_level,
        tls=tls,
        workers=_int(env, "WORKERS", 1, 1, 64),
        max_message_bytes=_int(env, "MAX_MESSAGE_BYTES", 64 * 1024, 1024, 4 * 1024 * 1024),
        password_checks=_int(env, "PASSWORD_CHECKS", os.cpu_count() or 1, 1, 256),
        password_check_queue=_int(env, "PASSWORD_CHECK_QUEUE", 16, 0, 10_000),
        password_hash_memory_kib=_int(
            env, "PASSWORD_HASH_MEMORY_KIB", 65536, MIN_HASH_MEMORY_KIB, 4 * 1024 * 1024
        ),
        password_hash_passes=_int(env, "PASSWORD_HASH_PASSES", 3, MIN_HASH_PASSES, 64),
        verify_batches_in_flight=_int(env, "VERIFY_BATCHES_IN_FLIGHT", 1, 1, 64),
        identity_cache_seconds=_int(env, "IDENTITY_CACHE_SECONDS", 2, 0, 60),
        client_certificate_accounts=certificate_accounts,
        tracing=_tracing(env),
        siem=_siem(env),
    )
