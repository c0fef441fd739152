"""Settings: loaded once at start, validated, immutable, injected.

Sources, later ones winning: built-in defaults, the TOML file given with ``--config`` (keys are
the variable names in lower case without the ``IOTVAULT_`` prefix), then ``IOTVAULT_*``
environment variables. Unknown keys in the file are an error rather than silently ignored: a
misspelt security setting must not fall back to a default. Any invalid value stops the program
with one message that names the setting (:class:`~iotvault.errors.ConfigError`); an
``IOTVAULT_*`` variable that names no setting is reported as a warning (the environment is
shared with other programs, so it does not stop the start). With ``production`` set,
:func:`check_production` refuses combinations that are fine on a laptop only.

Nothing here is built at import time; :func:`load_settings` is called by the command line and
the result passed down (``create_app(settings)``, ``Node(settings)``).
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import limits
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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


Port = Annotated[int, Field(ge=1, le=65535)]


def _between(lo: float, hi: float) -> Any:
    """A float setting's bounds; NaN and infinity are never a valid duration."""
    return Field(ge=lo, le=hi, allow_inf_nan=False)


class Settings(BaseSettings):
    """Every setting, its type and its bounds; frozen once made.

    A pydantic-settings model: types and ranges are field constraints, the broker admin's
    password a :class:`~pydantic.SecretStr`, and the checks that span fields run in one
    validator, so a ``Settings(...)`` made anywhere (a test, a benchmark) is checked like one
    loaded at start. The only source it reads by itself is its arguments: :func:`load_settings`
    merges the file and the environment first, so that an error names where the value came
    from, and nothing reads ``os.environ`` behind a caller's back.
    """

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, hide_input_in_errors=True
    )

    data_dir: Path = Path(".iotvault")
    # URLs may carry passwords: kept out of repr() so that logging settings leaks nothing
    database_url: str = Field("", repr=False)  # empty: SQLite in the data dir
    broker_url: str = Field("embedded", repr=False)
    mqtt_host: str = "127.0.0.1"
    mqtt_port: Port = 1883
    http_host: str = "127.0.0.1"
    http_port: Port = 8000
    public_url: str = ""  # empty: follows http_host and http_port (derived_public_url)
    master_key_file: Path | None = None  # None: <data_dir>/master.key
    redis_url: str = Field("", repr=False)
    oidc_external_issuer: str = ""
    oidc_external_audience: str = ""
    oidc_external_groups_claim: str = "groups"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text lines, or one JSON object per line for a log shipper; either way control characters
    # a client sent are escaped (iotvault.logformat)
    log_format: Annotated[Literal["text", "json"], Field(description="text or json lines")] = "text"
    # HTTP hardening
    cors_origins: str = ""  # comma-separated exact origins allowed to call the API from a browser
    # comma-separated addresses or networks of reverse proxies whose X-Forwarded-For and
    # X-Forwarded-Proto are believed; none by default: the connection's address is the client's
    trusted_proxies: str = ""
    max_request_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1_048_576
    rate_limit_per_ip: str = "1200/minute"
    rate_limit_per_principal: str = "600/minute"
    rate_limit_auth_failures: str = "30/minute"  # failed authentications per address and per API key
    # the built-in OpenID Connect provider (iotvault.identity)
    oidc_access_token_ttl_s: Annotated[int, Field(ge=60, le=3600)] = 300  # access and ID tokens
    # a token family's whole life, rotations included
    oidc_refresh_token_ttl_s: Annotated[int, Field(ge=3600, le=365 * 86_400)] = 30 * 86_400
    oidc_session_ttl_s: Annotated[int, Field(ge=300, le=30 * 86_400)] = 8 * 3600  # the browser's session
    # failed logins of one user name before a lockout; the lockout, and the window they count in
    oidc_login_max_failures: Annotated[int, Field(ge=1, le=100)] = 5
    oidc_lockout_s: Annotated[int, Field(ge=10, le=86_400)] = 900
    oidc_anonymous_rate: str = "20/hour"  # anonymous logins per client address
    # ingest tuning; defaults measured on a 2-core machine, see BENCHMARKS.md
    ingest_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    ingest_batch_ms: Annotated[float, _between(0.1, 10_000.0)] = 5.0
    ingest_client_id: str = "iotvault-ingest"
    ingest_dedupe_window_s: Annotated[float, _between(1.0, 86_400.0)] = 120.0
    # ---- several nodes (README, "Several nodes"; docs/design/cluster.md) ----
    # set: every ingest node subscribes through $share/<group>/... and the broker splits the load
    ingest_share_group: str = ""
    # this ingest node's identity in the group (its MQTT client id is <ingest_client_id>-<node id>);
    # empty: generated once and kept in <data_dir>/ingest-node-id. A replacement takes a dead
    # node's queued messages by starting with the same id.
    ingest_node_id: str = ""
    # `serve` (role all) with N >= 1: HTTP served by N child processes on its socket, the serve
    # process itself ingesting (iotvault.apiprocs); 0: HTTP in the same process
    api_processes: Annotated[int, Field(ge=0, le=16)] = 0
    # ---- Watson IoT Platform devices and applications (docs/watson-migration.md) ----
    # the organization in `d:<org>:<type>:<id>` and `a:<org>:<app>` client ids; empty: made once
    # (six lowercase letters and digits), kept in the database, shown by `iotvault org`
    org_id: str = ""
    # streams re-read the database this often even without a wake-up (a safety net only)
    stream_safety_poll_s: Annotated[float, _between(0.05, 3600.0)] = 30.0
    max_payload_bytes: Annotated[int, Field(ge=2, le=16 * 1024 * 1024)] = 65536
    key_cache_ttl_s: Annotated[float, _between(0.0, 3600.0)] = 5.0
    # accepted credentials and their principals are kept this long (never past their expiry);
    # every change to users, groups, API keys or grants empties the cache on every node at once
    # (the fan-out), so this bounds only what no fan-out reaches (README, "Caches")
    auth_cache_ttl_s: Annotated[float, _between(0.0, 300.0)] = 5.0
    # the HTTP server's parser and the event loop of `iotvault serve` (BENCHMARKS.md, issue 17)
    http_parser: Literal["httptools", "h11"] = "httptools"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # how long a thread of `iotvault serve` may hold the interpreter lock while another waits
    # for it (Python's default: 5 ms); the event loop and the ingest and audit writers share it
    switch_interval_ms: Annotated[float, _between(0.1, 100.0)] = 1.0
    # encoded, decrypted event documents kept in memory per node, in MiB (0: none); a device's
    # go at once when it is deleted, and after key_cache_ttl_s whatever happens
    read_cache_mib: Annotated[int, Field(ge=0, le=4096)] = 64
    # a kept page found current is answered without asking the database while this process
    # heard of no new event of its device (its own ingest at once, others' by the fan-out),
    # for at most this long; 0: asked on every read (iotvault.api.readcache)
    page_trust_ms: Annotated[float, _between(0.0, 60_000.0)] = 1000.0
    sqlite_synchronous: Literal["full", "normal"] = "full"
    # database connections a process keeps open; 0: sized for the node's role (README, "Settings")
    database_pool_size: Annotated[int, Field(ge=0, le=500)] = 0
    database_pool_overflow: Annotated[int, Field(ge=0, le=500)] = 5  # opened beyond it when busy
    # device security: broker accounts, TLS, commands (README, "Device security")
    broker_admin_username: str = ""  # Mosquitto dynamic-security admin: the broker follows the registry
    broker_admin_password: SecretStr = SecretStr("")
    broker_ca_file: str = ""  # CA certificates that verify an mqtts:// broker (default: the system's)
    mqtt_tls_cert_file: str = ""  # embedded broker: serve MQTT over TLS with this certificate chain
    mqtt_tls_key_file: str = ""  # ... and this private key
    # embedded broker: MQTT over TLS on this port as well, mqtt_port then staying plain; 0: TLS
    # (with a certificate) on mqtt_port itself
    mqtt_tls_port: Annotated[int, Field(ge=0, le=65535)] = 0
    mqtt_ws_port: Annotated[int, Field(ge=0, le=65535)] = 0  # embedded broker: MQTT over WebSocket; 0: off
    # embedded broker: a larger packet ends the connection
    mqtt_max_packet_bytes: Annotated[int, Field(ge=1024, le=268_435_455)] = 262_144
    command_expiry_s: Annotated[int, Field(ge=1, le=7 * 86_400)] = 300  # a command's default lifetime
    broker_log_file: str = ""  # Mosquitto's log (log_type all): its refusals become security events
    production: bool = False  # refuse insecure combinations at start (check_production)
    # ---- embedded broker limits (README, "Embedded broker limits"; iotvault.broker.limits) ----
    mqtt_max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # open connections in all
    mqtt_max_connections_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 500  # from one IP address
    # connections that have not sent CONNECT yet
    mqtt_max_pending_connects: Annotated[int, Field(ge=1, le=1_000_000)] = 1_024
    mqtt_connect_timeout_s: Annotated[float, Field(ge=0.1, le=600.0)] = 5.0  # time to send CONNECT
    # QoS 1/2 messages of one connection being stored at once
    mqtt_max_inflight: Annotated[int, Field(ge=1, le=65_535)] = 64
    mqtt_max_retained: Annotated[int, Field(ge=0, le=10_000_000)] = 1_000  # retained kept; 0: off
    mqtt_max_retained_bytes: Annotated[int, Field(ge=0, le=1 << 34)] = 1_048_576  # retained payload bytes
    mqtt_log_lines_per_connection: Annotated[int, Field(ge=0, le=1_000_000)] = 20  # log lines per connection
    # identical refusals within it become one row with a count
    security_events_window_s: Annotated[float, Field(ge=1.0, le=86_400.0)] = 60.0
    security_events_retention_days: Annotated[int, Field(ge=1, le=36_500)] = 90  # older rows are deleted
    # ---- end of embedded broker limits ----
    # ---- the audit log and alerts (README, "Audit log and alerts") ----
    audit_export_file: str = ""  # each signed checkpoint of the audit chain is also appended here
    audit_checkpoint_interval_s: Annotated[float, Field(ge=1.0, le=86_400.0)] = 60.0
    audit_retention_days: Annotated[int, Field(ge=0, le=36_500)] = 0  # 0: keep every record
    # false only to measure what recording every HTTP request costs (BENCHMARKS.md): changes,
    # sign-ins and refusals are still recorded, and the node's start record shows the setting
    audit_requests: Annotated[bool, Field(description="record every HTTP request")] = True
    # who chains and stores a node's batches of records: a child process (the node's event loop
    # keeps the interpreter lock to itself), or a thread of the node (iotvault.audit.appender)
    audit_writer: Literal["process", "thread"] = "process"
    alert_webhook_url: str = ""  # alerts are POSTed here, signed with alert_webhook_secret
    alert_webhook_secret: SecretStr = SecretStr("")
    # ---- start-up, readiness, shutdown and slow clients: the README's "Health and readiness" ----
    startup_fail_fast: bool = False  # serve: exit when the database is down at start, instead of waiting
    # serve: how long open HTTP requests may finish at shutdown
    http_shutdown_grace_s: Annotated[float, Field(ge=0.0, le=300.0)] = 5.0
    http_header_timeout_s: Annotated[float, Field(ge=1.0, le=300.0)] = (
        10.0  # a request's headers arrive within
    )
    http_body_timeout_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 30.0  # ... and its body within this
    http_idle_timeout_s: Annotated[float, Field(ge=1.0, le=300.0)] = 5.0  # idle keep-alive connections close
    http_max_connections: Annotated[int, Field(ge=10, le=1_000_000)] = 1000  # more answer 503

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments only: :func:`load_settings` is the one place that reads the environment."""
        return (init_settings,)

    @model_validator(mode="after")
    def _checked(self) -> Settings:
        if not self.public_url:  # frozen: the one field filled in after the fact
            object.__setattr__(self, "public_url", derived_public_url(self.http_host, self.http_port))
        _validate(self)
        if self.production:
            check_production(self)
        return self

    # ---- derived values -------------------------------------------------------------
    @property
    def given(self) -> frozenset[str]:
        """The settings named by the file or the environment, not defaults (the demo moves
        only ports nobody chose)."""
        return frozenset(self.model_fields_set)

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
    def trusted_proxy_list(self) -> list[str]:
        """The trusted proxies as uvicorn compares them: ``10.1.2.3/8`` becomes ``10.0.0.0/8``."""
        return [_proxy(p) for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)

    def with_ports(self, *, http_port: int | None = None, mqtt_port: int | None = None) -> Settings:
        """Other listening ports; a public URL that was not given follows the HTTP port."""
        values = {name: getattr(self, name) for name in self.model_fields_set}
        values["http_port"] = self.http_port if http_port is None else http_port
        values["mqtt_port"] = self.mqtt_port if mqtt_port is None else mqtt_port
        return type(self)(**values)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104  # nosec B104 - names to compare with, nothing binds them


def derived_public_url(http_host: str, http_port: int) -> str:
    """The public URL when none is given: where the HTTP server listens (loopback for a wildcard)."""
    host = "127.0.0.1" if http_host in _WILDCARD_HOSTS else http_host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{http_port}"


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


def _proxy(value: str) -> str:
    """One trusted proxy: an IP address, or a network (host bits allowed: ``10.1.2.3/8``)."""
    value = value.strip()
    try:
        return str(ipaddress.ip_network(value, strict=False) if "/" in value else ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or a network like 10.0.0.0/8") from None


def _check_rate(name: str, value: str) -> None:
    """A rate in the notation of the ``limits`` library, which every rate of iotvault is read
    with (the API's limiter and the login throttle): one limit, at least 1 per period."""
    try:
        item = limits.parse(value)
    except ValueError:
        item = None
    if item is None or item.amount < 1 or ";" in value or "," in value:
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


def _coerce(name: str, raw: Any, field_name: str) -> Any:
    """Turn a raw value from TOML or the environment into the type of the setting.

    Stricter than pydantic's lax mode on purpose: TOML gives typed values, and ``true`` for a
    number or ``8080.9`` for a port is refused here rather than read as 1 or rounded.
    """
    current = Settings.model_fields[field_name].default
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


_ORG_ID = re.compile(r"[a-z0-9]{1,32}")


def _check_trusted_proxies(s: Settings) -> None:
    try:
        s.trusted_proxy_list  # noqa: B018 - each one parsed
    except ValueError as exc:
        raise ConfigError("trusted_proxies", str(exc)) from None


def _check_org_id(s: Settings) -> None:
    """An organization id becomes part of client ids, so it has no ':' and no wildcards."""
    if s.org_id and not _ORG_ID.fullmatch(s.org_id):
        raise ConfigError("org_id", "expected 1-32 of a-z 0-9 (Watson IoT organization ids are six)")


def _check_node_names(s: Settings) -> None:
    """A share group and a node id become parts of a topic filter and a client id."""
    for name in ("ingest_share_group", "ingest_node_id"):
        value = getattr(s, name)
        if value and not _NODE_NAME.fullmatch(value):
            raise ConfigError(name, "expected 1-64 of A-Z a-z 0-9 . _ -")


def _validate(s: Settings) -> None:
    """The checks a field constraint cannot say: formats, and settings that go together."""
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
    _check_trusted_proxies(s)
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
    _check_node_names(s)
    _check_org_id(s)
    _check_device_security(s)
    if s.alert_webhook_url:
        hook = urlsplit(s.alert_webhook_url)
        if hook.scheme not in ("http", "https") or not hook.hostname or hook.username or hook.password:
            raise ConfigError("alert_webhook_url", "expected an http(s):// URL without credentials")
        if len(s.alert_webhook_secret.get_secret_value()) < 16:
            raise ConfigError(
                "alert_webhook_secret", "needs at least 16 characters when alert_webhook_url is set"
            )


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional TOML file and the environment.

    ``warn`` is told about ``IOTVAULT_*`` variables that name no setting (a typo such as
    ``IOTVAULT_HTTP_PROT`` would otherwise leave the default in force without a word). They
    warn rather than stop: the environment is shared with other programs and other versions.
    """
    env = os.environ if environ is None else environ
    known = set(Settings.model_fields)
    values = _file_values(config_file, known) if config_file is not None else {}
    for name in known:
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            values[name] = _coerce(env_name, env[env_name], name)
    if warn is not None:
        for message in unknown_environment(env, known):
            warn(message)
    if not values.get("public_url"):
        values.pop("public_url", None)  # unset or empty: it follows the HTTP host and port
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = _config_error(exc)
    except ConfigError as exc:
        error = exc
    # report the environment variable's name when that is where the value came from
    env_name = ENV_PREFIX + error.setting.upper()
    if error.setting in known and env_name in env:
        raise ConfigError(env_name, error.reason) from None
    raise error


def _file_values(config_file: Path, known: set[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {config_file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{config_file} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in known:
            raise ConfigError(key, f"unknown setting in {config_file}")
        values[key] = _coerce(key, raw, key)
    return values


def _config_error(exc: ValidationError) -> ConfigError:
    """pydantic's first complaint as the one-line error naming the setting."""
    first = exc.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "settings"
    message = str(first["msg"])
    reason = message[:1].lower() + message[1:]
    if name not in ("broker_admin_password", "alert_webhook_secret") and "input" in first:
        reason = f"{first['input']!r}: {reason}"
    return ConfigError(name, reason)


def _check_device_security(s: Settings) -> None:
    """Broker accounts and TLS: settings that only make sense together, and files that exist."""
    admin_password = s.broker_admin_password.get_secret_value()
    if s.broker_admin_username or admin_password:
        if parse_broker_url(s.broker_url).embedded:
            raise ConfigError(
                "broker_admin_username", "is for an external broker (Mosquitto); the embedded one needs none"
            )
        if not (s.broker_admin_username and admin_password):
            raise ConfigError(
                "broker_admin_password" if s.broker_admin_username else "broker_admin_username",
                "broker_admin_username and broker_admin_password go together",
            )
    if bool(s.mqtt_tls_cert_file) != bool(s.mqtt_tls_key_file):
        raise ConfigError(
            "mqtt_tls_key_file" if s.mqtt_tls_cert_file else "mqtt_tls_cert_file",
            "mqtt_tls_cert_file and mqtt_tls_key_file go together",
        )
    if s.mqtt_tls_port and not s.mqtt_tls_cert_file:
        raise ConfigError("mqtt_tls_port", "needs mqtt_tls_cert_file and mqtt_tls_key_file")
    ports = [p for p in (s.mqtt_port, s.mqtt_tls_port, s.mqtt_ws_port) if p]
    if len(set(ports)) != len(ports):
        raise ConfigError(
            "mqtt_ws_port" if s.mqtt_ws_port in ports[:-1] else "mqtt_tls_port",
            "mqtt_port, mqtt_tls_port and mqtt_ws_port must differ",
        )
    for name in ("broker_ca_file", "mqtt_tls_cert_file", "mqtt_tls_key_file"):
        value = getattr(s, name)
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(name, f"{value} is not a readable file")


def unknown_environment(env: Mapping[str, str], known: Iterable[str]) -> Iterator[str]:
    """A message for each ``IOTVAULT_*`` variable that names no setting, with the likeliest one."""
    names = {ENV_PREFIX + n.upper() for n in known}
    for var in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in names):
        close = difflib.get_close_matches(var, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        yield f"{var} is not a setting and is ignored{hint}"


def check_production(s: Settings) -> None:
    """Refuse what is acceptable on a laptop but not in production (``IOTVAULT_PRODUCTION``).

    Each of these leaks credentials or data to anyone on the path, or the key to anyone on
    the machine: plain HTTP on an address others can reach (passwords, tokens and cookies in
    clear), an external broker without TLS or without credentials, a master key file that
    group or others may read.
    """
    pub = urlsplit(s.public_url)
    if pub.scheme != "https" and pub.hostname not in LOOPBACK_HOSTS:
        raise ConfigError("public_url", "must be https:// in production unless it is a loopback address")
    if s.http_host not in LOOPBACK_HOSTS and pub.scheme != "https":
        raise ConfigError(
            "http_host", "serves plain HTTP beyond this machine; put TLS in front (https public_url)"
        )
    b = s.broker
    if not b.embedded:
        if not b.tls and b.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                "broker_url", "an external broker beyond this machine needs mqtts:// in production"
            )
        if not (b.username or s.broker_admin_username):
            raise ConfigError(
                "broker_url", "an external broker needs credentials in production (user:pass@host)"
            )
    key = s.effective_master_key_file
    with contextlib.suppress(FileNotFoundError):
        if key.stat().st_mode & 0o077:
            raise ConfigError("master_key_file", f"{key} may be read by group or others (chmod 600 it)")
