"""Settings: loaded once at start, validated, immutable, injected.

Sources, later ones winning: built-in defaults, the TOML file given with ``--config`` (keys are
the variable names in lower case without the ``IOTVAULT_`` prefix), then ``IOTVAULT_*``
environment variables. Unknown keys in the file are an error rather than silently ignored: a
misspelt security setting must not fall back to a default. Any invalid value stops the program
with one message that names the setting (:class:`~iotvault.errors.ConfigError`).

Nothing here is built at import time; :func:`load_settings` is called by the command line and
the result passed down (``create_app(settings)``, ``Node(settings)``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iotvault.errors import ConfigError

ENV_PREFIX = "IOTVAULT_"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where iotvault's own MQTT clients connect: ``embedded`` or an external broker."""

    embedded: bool
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        if self.embedded:
            return "embedded"
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path(".iotvault")
    # URLs may carry passwords: kept out of repr() so that logging settings leaks nothing
    database_url: str = field(default="", repr=False)  # empty: SQLite in the data dir
    broker_url: str = field(default="embedded", repr=False)
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_url: str = "http://127.0.0.1:8000"
    master_key_file: Path | None = None  # None: <data_dir>/master.key
    redis_url: str = field(default="", repr=False)
    oidc_external_issuer: str = ""
    oidc_external_audience: str = ""
    oidc_external_groups_claim: str = "groups"
    log_level: str = "info"
    # HTTP hardening
    cors_origins: str = ""  # comma-separated exact origins allowed to call the API from a browser
    max_request_bytes: int = 1_048_576
    rate_limit_per_ip: str = "1200/minute"
    rate_limit_per_principal: str = "600/minute"
    rate_limit_auth_failures: str = "30/minute"  # failed authentications per client address
    # the built-in OpenID Connect provider (iotvault.identity)
    oidc_access_token_ttl_s: int = 300  # access and ID tokens
    oidc_refresh_token_ttl_s: int = 30 * 86_400  # a token family's whole life, rotations included
    oidc_session_ttl_s: int = 8 * 3600  # the browser's login session
    oidc_login_max_failures: int = 5  # failed logins of one user name before a lockout
    oidc_lockout_s: int = 900  # the lockout, and the window the failures are counted in
    oidc_anonymous_rate: str = "20/hour"  # anonymous logins per client address
    # ingest tuning; defaults measured on a 2-core machine, see BENCHMARKS.md
    ingest_batch_size: int = 500
    ingest_batch_ms: float = 5.0
    ingest_client_id: str = "iotvault-ingest"
    ingest_dedupe_window_s: float = 120.0
    max_payload_bytes: int = 65536
    key_cache_ttl_s: float = 5.0
    sqlite_synchronous: str = "full"
    # device security: broker accounts, TLS, commands (README, "Device security")
    broker_admin_username: str = ""  # Mosquitto dynamic-security admin: the broker follows the registry
    broker_admin_password: str = field(default="", repr=False)
    broker_ca_file: str = ""  # CA certificates that verify an mqtts:// broker (default: the system's)
    mqtt_tls_cert_file: str = ""  # embedded broker: serve MQTT over TLS with this certificate chain
    mqtt_tls_key_file: str = ""  # ... and this private key
    mqtt_max_packet_bytes: int = 262_144  # embedded broker: a larger packet ends the connection
    command_expiry_s: int = 300  # a command's lifetime unless the request says otherwise
    broker_log_file: str = ""  # Mosquitto's log (log_type all): its refusals become security events
    # start-up, readiness, shutdown and slow clients: see the README's "Health and readiness"
    startup_fail_fast: bool = False  # serve: exit when the database is down at start, instead of waiting
    http_shutdown_grace_s: float = 5.0  # serve: how long open HTTP requests may finish at shutdown
    http_header_timeout_s: float = 10.0  # a request's headers must arrive within this
    http_body_timeout_s: float = 30.0  # ... and its body within this
    http_idle_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    http_max_connections: int = 1000  # more concurrent connections answer 503

    # ---- derived values -------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'iotvault.db').as_posix()}"

    @property
    def effective_master_key_file(self) -> Path:
        return self.master_key_file if self.master_key_file is not None else self.data_dir / "master.key"

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)


_INT_RANGES: dict[str, tuple[int, int]] = {
    "mqtt_port": (1, 65535),
    "http_port": (1, 65535),
    "ingest_batch_size": (1, 100_000),
    "max_payload_bytes": (2, 16 * 1024 * 1024),
    "max_request_bytes": (1024, 64 * 1024 * 1024),
    "mqtt_max_packet_bytes": (1024, 268_435_455),
    "command_expiry_s": (1, 7 * 86_400),
    "oidc_access_token_ttl_s": (60, 3600),
    "oidc_refresh_token_ttl_s": (3600, 365 * 86_400),
    "oidc_session_ttl_s": (300, 30 * 86_400),
    "oidc_login_max_failures": (1, 100),
    "oidc_lockout_s": (10, 86_400),
    "http_max_connections": (10, 1_000_000),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "ingest_batch_ms": (0.1, 10_000.0),
    "ingest_dedupe_window_s": (1.0, 86_400.0),
    "key_cache_ttl_s": (0.0, 3600.0),
    "http_shutdown_grace_s": (0.0, 300.0),
    "http_header_timeout_s": (1.0, 300.0),
    "http_body_timeout_s": (1.0, 3600.0),
    "http_idle_timeout_s": (1.0, 300.0),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "log_level": ("debug", "info", "warning", "error"),
    "sqlite_synchronous": ("full", "normal"),
}


def parse_broker_url(value: str) -> BrokerAddress:
    if value == "embedded":
        return BrokerAddress(embedded=True)
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            "broker_url", f"expected 'embedded', mqtt://host:port or mqtts://host:port, got {value!r}"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError("broker_url", "the port is not a number between 1 and 65535")
    if not parts.hostname:
        raise ConfigError("broker_url", "the URL has no host")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        embedded=False,
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        username=parts.username,
        password=parts.password,
    )


def _check_rate(name: str, value: str) -> None:
    count, _, per = value.partition("/")
    if (
        not count.strip().isdigit()
        or int(count) < 1
        or per.strip() not in ("second", "minute", "hour", "day")
    ):
        raise ConfigError(name, f"expected '<count>/<second|minute|hour|day>', got {value!r}")


def _check_database_url(value: str) -> None:
    if not value:
        return
    scheme = value.split(":", 1)[0]
    if "://" not in value or scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "postgres"):
        raise ConfigError(
            "database_url",
            f"expected sqlite:///path or postgresql://user:pass@host:port/db, got {scheme}://…",
        )


def _coerce(name: str, raw: Any, current: Any, field_name: str) -> Any:
    """Turn a raw value from TOML or the environment into the type of the setting."""
    try:
        if isinstance(current, bool):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        # TOML gives typed values: refuse true for a number and 8080.9 for a port, never round
        if isinstance(raw, bool) or (isinstance(current, int) and isinstance(raw, float)):
            raise ValueError  # noqa: TRY004, TRY301 - reported below as a ConfigError
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if field_name == "data_dir" and not str(raw):
            raise ConfigError(name, "must not be empty")
        if field_name in ("data_dir", "master_key_file"):
            return Path(str(raw)).expanduser() if str(raw) else None
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(name, f"{raw!r} is not a valid {type(current).__name__}") from None


def _validate(s: Settings) -> Settings:  # noqa: PLR0912 - one flat list of checks
    for name, (lo, hi) in _INT_RANGES.items():
        v = getattr(s, name)
        if not lo <= v <= hi:
            raise ConfigError(name, f"{v} is outside {lo}..{hi}")
    for name, (flo, fhi) in _FLOAT_RANGES.items():
        fv = getattr(s, name)
        if not flo <= fv <= fhi:
            raise ConfigError(name, f"{fv} is outside {flo}..{fhi}")
    for name, choices in _CHOICES.items():
        if getattr(s, name) not in choices:
            raise ConfigError(name, f"{getattr(s, name)!r} is not one of {', '.join(choices)}")
    parse_broker_url(s.broker_url)
    _check_database_url(s.database_url)
    for name in (
        "rate_limit_per_ip",
        "rate_limit_per_principal",
        "rate_limit_auth_failures",
        "oidc_anonymous_rate",
    ):
        _check_rate(name, getattr(s, name))
    for origin in s.cors_origin_list:
        o = urlsplit(origin)
        if o.scheme not in ("http", "https") or not o.hostname or o.path not in ("", "/") or origin == "*":
            raise ConfigError(
                "cors_origins", f"{origin!r} is not an exact origin like https://app.example.com"
            )
    if s.oidc_external_issuer:
        iss = urlsplit(s.oidc_external_issuer)
        if iss.scheme != "https" and iss.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError("oidc_external_issuer", "must be an https:// URL")
        if not s.oidc_external_audience:
            raise ConfigError("oidc_external_audience", "is required when oidc_external_issuer is set")
    pub = urlsplit(s.public_url)
    if pub.scheme not in ("http", "https") or not pub.hostname:
        raise ConfigError("public_url", f"expected an http(s):// URL, got {s.public_url!r}")
    if pub.query or pub.fragment or pub.username or pub.password:
        # it is the OpenID Connect issuer (RFC 8414: no query or fragment)
        raise ConfigError("public_url", "must not have a query, a fragment or credentials")
    if s.redis_url and urlsplit(s.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis_url", "expected redis://host:port/db")
    _check_device_security(s)
    return s


def load_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, an optional TOML file and the environment."""
    env = os.environ if environ is None else environ
    settings = Settings()
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{config_file} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in known:
                raise ConfigError(key, f"unknown setting in {config_file}")
            values[key] = _coerce(key, raw, getattr(settings, key), key)
    for name in known:
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            values[name] = _coerce(env_name, env[env_name], getattr(settings, name), name)
    try:
        return _validate(replace(settings, **values))
    except ConfigError as exc:
        # report the environment variable's name when that is where the value came from
        env_name = ENV_PREFIX + exc.setting.upper()
        if exc.setting in known and env_name in env:
            raise ConfigError(env_name, exc.reason) from None
        raise


def _check_device_security(s: Settings) -> None:
    """Broker accounts and TLS: settings that only make sense together, and files that exist."""
    if s.broker_admin_username or s.broker_admin_password:
        if parse_broker_url(s.broker_url).embedded:
            raise ConfigError(
                "broker_admin_username", "is for an external broker (Mosquitto); the embedded one needs none"
            )
        if not (s.broker_admin_username and s.broker_admin_password):
            raise ConfigError(
                "broker_admin_password" if s.broker_admin_username else "broker_admin_username",
                "broker_admin_username and broker_admin_password go together",
            )
    if bool(s.mqtt_tls_cert_file) != bool(s.mqtt_tls_key_file):
        raise ConfigError(
            "mqtt_tls_key_file" if s.mqtt_tls_cert_file else "mqtt_tls_cert_file",
            "mqtt_tls_cert_file and mqtt_tls_key_file go together",
        )
    for name in ("broker_ca_file", "mqtt_tls_cert_file", "mqtt_tls_key_file"):
        value = getattr(s, name)
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(name, f"{value} is not a readable file")
