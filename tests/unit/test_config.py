"""Settings: defaults, TOML file, environment on top, and one ConfigError naming the bad setting."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from iotvault.config import BrokerAddress, Settings, load_settings, parse_broker_url
from iotvault.errors import ConfigError

ANY_HOST = "0.0.0.0"  # noqa: S104 - a setting under test, nothing binds it


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iotvault.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(config: Path | None = None, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(config, {} if environ is None else environ)
    return info.value


# ---- defaults and sources -----------------------------------------------------------
def test_defaults_without_file_or_environment() -> None:
    s = load_settings(None, {})
    assert s == Settings()
    assert s.http_host == "127.0.0.1"
    assert s.http_port == 8000
    assert s.mqtt_port == 1883
    assert s.broker_url == "embedded"
    assert s.broker == BrokerAddress(embedded=True)
    assert s.broker.display == "embedded"
    assert s.database_url == ""
    assert s.log_level == "info"
    assert s.data_dir == Path(".iotvault")
    assert s.effective_master_key_file == Path(".iotvault") / "master.key"


def test_default_database_is_sqlite_in_the_data_dir() -> None:
    assert Settings().effective_database_url == "sqlite:///.iotvault/iotvault.db"


def test_database_follows_a_data_dir_from_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = load_settings(config_file(tmp_path, f"data_dir = {str(data)!r}\n"), {})
    assert s.data_dir == data
    assert s.effective_database_url == f"sqlite:///{(data / 'iotvault.db').as_posix()}"
    assert s.effective_master_key_file == data / "master.key"


def test_an_explicit_database_url_wins_over_the_default(tmp_path: Path) -> None:
    url = "postgresql://iot:pw@db.example:5432/iotvault"
    assert load_settings(None, {"IOTVAULT_DATABASE_URL": url}).effective_database_url == url
    s = load_settings(config_file(tmp_path, f'database_url = "{url}"\n'), {})
    assert s.effective_database_url == url


def test_file_values_override_the_defaults(tmp_path: Path) -> None:
    s = load_settings(
        config_file(
            tmp_path,
            'http_port = 9000\nlog_level = "debug"\ningest_batch_ms = 2.5\nbroker_url = "mqtt://b.example"\n',
        ),
        {},
    )
    assert s.http_port == 9000
    assert s.log_level == "debug"
    assert s.ingest_batch_ms == 2.5
    assert s.broker_url == "mqtt://b.example"
    assert s.mqtt_port == 1883  # untouched settings keep their defaults


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'http_port = 9000\nlog_level = "debug"\n')
    s = load_settings(path, {"IOTVAULT_HTTP_PORT": "9100"})
    assert s.http_port == 9100
    assert s.log_level == "debug"


def test_environment_values_are_coerced_to_the_setting_type() -> None:
    s = load_settings(
        None,
        {
            "IOTVAULT_HTTP_PORT": "8081",
            "IOTVAULT_INGEST_BATCH_MS": "7.5",
            "IOTVAULT_INGEST_BATCH_SIZE": "42",
            "IOTVAULT_LOG_LEVEL": "warning",
        },
    )
    assert (s.http_port, s.ingest_batch_ms, s.ingest_batch_size, s.log_level) == (8081, 7.5, 42, "warning")


def test_unrelated_environment_variables_are_ignored() -> None:
    s = load_settings(None, {"HTTP_PORT": "1", "IOTVAULT_NOT_A_SETTING": "x", "iotvault_http_port": "2"})
    assert s == Settings()


def test_settings_are_immutable() -> None:
    s = load_settings(None, {})
    with pytest.raises(pydantic.ValidationError):  # frozen
        s.http_port = 1  # type: ignore[misc]


# ---- the file's keys ----------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    ["HTTP_PORT", "IOTVAULT_HTTP_PORT", "iotvault_http_port", "http-port", "htp_port", "master_key"],
)
def test_unknown_or_misspelt_keys_in_the_file_are_errors_naming_the_key(tmp_path: Path, key: str) -> None:
    err = load_error(config_file(tmp_path, f'"{key}" = 1\n'))
    assert err.setting == key
    assert key in str(err)


def test_a_table_in_the_file_is_an_unknown_key(tmp_path: Path) -> None:
    err = load_error(config_file(tmp_path, "[server]\nhttp_port = 9000\n"))
    assert err.setting == "server"


def test_invalid_toml_is_reported_against_the_config_option(tmp_path: Path) -> None:
    err = load_error(config_file(tmp_path, "http_port = = 9000\n"))
    assert err.setting == "--config"


def test_a_missing_file_is_reported_against_the_config_option(tmp_path: Path) -> None:
    err = load_error(tmp_path / "absent.toml")
    assert err.setting == "--config"


# ---- invalid ports ------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "70000", "65536", "-1", "abc", "", "80 80", "1.5"])
def test_invalid_port_from_the_environment_names_the_variable(value: str) -> None:
    err = load_error(environ={"IOTVAULT_HTTP_PORT": value})
    assert err.setting == "IOTVAULT_HTTP_PORT"
    assert "IOTVAULT_HTTP_PORT" in str(err)


@pytest.mark.parametrize("value", ["0", "70000", "65536", "-1", '"abc"', "true", "false", "[8000]"])
def test_invalid_port_from_the_file_names_the_key(tmp_path: Path, value: str) -> None:
    err = load_error(config_file(tmp_path, f"http_port = {value}\n"))
    assert err.setting == "http_port"
    assert "http_port" in str(err)


def test_an_invalid_file_port_is_reported_against_the_file_even_with_other_env_vars(tmp_path: Path) -> None:
    err = load_error(config_file(tmp_path, "http_port = 0\n"), {"IOTVAULT_MQTT_PORT": "1884"})
    assert err.setting == "http_port"


def test_a_valid_env_port_replaces_an_out_of_range_file_port(tmp_path: Path) -> None:
    s = load_settings(config_file(tmp_path, "http_port = 70000\n"), {"IOTVAULT_HTTP_PORT": "8080"})
    assert s.http_port == 8080


@pytest.mark.parametrize("value", ["1", "65535"])
def test_port_range_bounds_are_accepted(value: str) -> None:
    assert load_settings(None, {"IOTVAULT_MQTT_PORT": value}).mqtt_port == int(value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOTVAULT_LOG_LEVEL", "verbose"),
        ("IOTVAULT_INGEST_BATCH_MS", "0"),
        ("IOTVAULT_INGEST_BATCH_MS", "nan"),
        ("IOTVAULT_INGEST_DEDUPE_WINDOW_S", "inf"),
        ("IOTVAULT_INGEST_BATCH_SIZE", "0"),
        ("IOTVAULT_PUBLIC_URL", "ftp://example.org"),
        ("IOTVAULT_REDIS_URL", "http://cache"),
        ("IOTVAULT_SQLITE_SYNCHRONOUS", "off"),
    ],
)
def test_other_invalid_environment_values_name_their_variable(variable: str, value: str) -> None:
    assert load_error(environ={variable: value}).setting == variable


# ---- the broker URL -----------------------------------------------------------------
def test_embedded_broker() -> None:
    assert parse_broker_url("embedded") == BrokerAddress(embedded=True)


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://h:1884", "h", 1884, False),
        ("mqtt://broker.example", "broker.example", 1883, False),
        ("mqtts://h", "h", 8883, True),
        ("mqtts://h:9883", "h", 9883, True),
        ("mqtt://[::1]:1885", "::1", 1885, False),
    ],
)
def test_external_broker_urls(url: str, host: str, port: int, tls: bool) -> None:
    broker = load_settings(None, {"IOTVAULT_BROKER_URL": url}).broker
    assert broker == BrokerAddress(embedded=False, host=host, port=port, tls=tls)
    assert not broker.embedded
    assert broker.display == f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"


def test_credentials_are_kept_but_the_password_is_not_in_the_repr() -> None:
    password = "Pa55-w0rd-xyzzy"
    broker = load_settings(None, {"IOTVAULT_BROKER_URL": f"mqtt://ingest:{password}@h:1"}).broker
    assert (broker.host, broker.port, broker.tls) == ("h", 1, False)
    assert broker.username == "ingest"
    assert broker.password == password
    assert password not in repr(broker)
    assert password not in broker.display


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://h:1883",
        "tcp://h:1883",
        "ws://h",
        "h:1883",
        "broker.example",
        "Embedded",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:abc",
        "mqtt://h:70000",
    ],
)
def test_bad_broker_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert info.value.setting == "broker_url"
    assert load_error(environ={"IOTVAULT_BROKER_URL": url}).setting == "IOTVAULT_BROKER_URL"


def test_bad_broker_url_in_the_file_names_the_key(tmp_path: Path) -> None:
    err = load_error(config_file(tmp_path, 'broker_url = "amqp://h"\n'))
    assert err.setting == "broker_url"


# ---- the database URL ---------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///var/lib/iotvault/iotvault.db",
        "postgresql://u:p@h:5432/db",
        "postgresql+psycopg://u:p@h/db",
        "postgres://u@h/db",
    ],
)
def test_supported_database_urls(url: str) -> None:
    assert load_settings(None, {"IOTVAULT_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    "url", ["mysql://u:p@h/db", "postgresql+asyncpg://u@h/db", "oracle://h", "http://h/db", "file:///x.db"]
)
def test_unsupported_database_schemes_are_config_errors(tmp_path: Path, url: str) -> None:
    assert load_error(environ={"IOTVAULT_DATABASE_URL": url}).setting == "IOTVAULT_DATABASE_URL"
    assert load_error(config_file(tmp_path, f'database_url = "{url}"\n')).setting == "database_url"


# ---- second round: the public URL follows the HTTP port, unknown variables, production ----
def test_public_url_follows_the_http_host_and_port_unless_given() -> None:
    s = load_settings(environ={"IOTVAULT_HTTP_PORT": "8123"})
    assert s.public_url == "http://127.0.0.1:8123"
    assert load_settings(environ={"IOTVAULT_HTTP_HOST": ANY_HOST}).public_url == "http://127.0.0.1:8000"
    assert load_settings(environ={"IOTVAULT_HTTP_HOST": "::1"}).public_url == "http://[::1]:8000"
    assert s.with_ports(http_port=9001).public_url == "http://127.0.0.1:9001"
    given = load_settings(
        environ={"IOTVAULT_HTTP_PORT": "8123", "IOTVAULT_PUBLIC_URL": "https://iot.example"}
    )
    assert given.public_url == "https://iot.example"
    assert given.with_ports(http_port=9001).public_url == "https://iot.example"  # given: never moved
    assert "http_port" in given.given
    assert "mqtt_port" not in given.given


def test_unknown_environment_variables_warn_with_the_likely_name() -> None:
    warned: list[str] = []
    s = load_settings(
        environ={"IOTVAULT_HTTP_PROT": "9000", "IOTVAULT_LOG_LEVEL": "info"}, warn=warned.append
    )
    assert s.http_port == 8000
    assert warned == ["IOTVAULT_HTTP_PROT is not a setting and is ignored (did you mean IOTVAULT_HTTP_PORT?)"]
    warned.clear()
    load_settings(environ={"IOTVAULT_LOG_LEVEL": "info", "OTHER": "x"}, warn=warned.append)
    assert warned == []


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"IOTVAULT_PUBLIC_URL": "http://iot.example"}, "IOTVAULT_PUBLIC_URL"),
        ({"IOTVAULT_HTTP_HOST": ANY_HOST}, "IOTVAULT_HTTP_HOST"),
        ({"IOTVAULT_BROKER_URL": "mqtt://u:p@broker.example:1883"}, "IOTVAULT_BROKER_URL"),
        ({"IOTVAULT_BROKER_URL": "mqtts://broker.example"}, "IOTVAULT_BROKER_URL"),
    ],
)
def test_production_refuses_insecure_combinations(env: dict[str, str], setting: str, tmp_path: Path) -> None:
    base = {"IOTVAULT_PRODUCTION": "true", "IOTVAULT_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={**base, **env})
    assert caught.value.setting == setting


def test_production_accepts_a_sound_setup_and_refuses_an_open_master_key(tmp_path: Path) -> None:
    base = {"IOTVAULT_PRODUCTION": "true", "IOTVAULT_DATA_DIR": str(tmp_path)}
    sound = {
        **base,
        "IOTVAULT_HTTP_HOST": ANY_HOST,
        "IOTVAULT_PUBLIC_URL": "https://iot.example",
        "IOTVAULT_BROKER_URL": "mqtts://u:p@broker.example",
    }
    assert load_settings(environ=sound).production
    assert load_settings(environ=base).production  # loopback only: plain HTTP is fine
    key = tmp_path / "master.key"
    key.write_bytes(b"x" * 32)
    key.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=base)
    assert caught.value.setting == "master_key_file"
    assert "chmod 600" in caught.value.reason
    key.chmod(0o600)
    load_settings(environ=base)


@pytest.mark.parametrize("rate", ["0/minute", "abc", "10/minute;20/hour", "-1/minute", "10", "10/fortnight"])
def test_a_rate_the_limits_notation_cannot_read_as_one_limit_is_refused(rate: str) -> None:
    with pytest.raises(ConfigError, match=r"IOTVAULT_RATE_LIMIT_PER_IP|rate_limit_per_ip"):
        load_settings(None, {"IOTVAULT_RATE_LIMIT_PER_IP": rate})


def test_every_rate_is_read_by_the_one_parser_the_limiter_uses() -> None:
    """The login throttle and the API limiter read the same setting the same way."""
    import limits  # noqa: PLC0415

    from iotvault.identity.throttle import UserLoginThrottle  # noqa: PLC0415

    s = load_settings(None, {"IOTVAULT_OIDC_ANONYMOUS_RATE": "20/hour"})
    throttle = UserLoginThrottle(
        None, lambda _e: None, max_failures=5, window_s=60, anonymous_rate=s.oidc_anonymous_rate
    )  # type: ignore[arg-type]
    item = limits.parse(s.oidc_anonymous_rate)
    assert (throttle._anon_count, throttle._anon_window_us) == (item.amount, item.get_expiry() * 1_000_000)
    assert (item.amount, item.get_expiry()) == (20, 3600)


def test_embedded_broker_limits_are_on_by_default_and_configurable() -> None:
    from iotvault.wiring import broker_limits  # noqa: PLC0415 -- the broker side only here

    defaults = broker_limits(load_settings(environ={}))
    assert defaults.max_pending_connects == 1_024
    assert defaults.connect_timeout_s == 5.0
    assert defaults.max_retained == 1_000
    env = {"IOTVAULT_MQTT_MAX_RETAINED": "0", "IOTVAULT_MQTT_CONNECT_TIMEOUT_S": "2.5"}
    tuned = broker_limits(load_settings(environ=env))
    assert (tuned.max_retained, tuned.connect_timeout_s) == (0, 2.5)
    with pytest.raises(ConfigError, match="IOTVAULT_MQTT_MAX_CONNECTIONS_PER_ADDRESS"):
        load_settings(environ={"IOTVAULT_MQTT_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    with pytest.raises(ConfigError, match="IOTVAULT_SECURITY_EVENTS_RETENTION_DAYS"):
        load_settings(environ={"IOTVAULT_SECURITY_EVENTS_RETENTION_DAYS": "0"})


def test_further_broker_listeners(tmp_path: Path) -> None:
    from iotvault.wiring import further_listeners, main_port_tls  # noqa: PLC0415 -- as above

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("x")
    key.write_text("x")
    tls = {"IOTVAULT_MQTT_TLS_CERT_FILE": str(cert), "IOTVAULT_MQTT_TLS_KEY_FILE": str(key)}
    assert "IOTVAULT_MQTT_TLS_PORT" in str(
        load_error(environ={"IOTVAULT_MQTT_TLS_PORT": "8883"})
    )  # no certificate
    same = {**tls, "IOTVAULT_MQTT_PORT": "8883", "IOTVAULT_MQTT_TLS_PORT": "8883"}
    assert "must differ" in str(load_error(environ=same))
    assert "IOTVAULT_MQTT_WS_PORT" in str(load_error(environ={"IOTVAULT_MQTT_WS_PORT": "1883"}))
    assert "IOTVAULT_MQTT_WS_PORT" in str(load_error(environ={"IOTVAULT_MQTT_WS_PORT": "70000"}))
    plain = load_settings(environ={})
    assert (plain.mqtt_tls_port, plain.mqtt_ws_port, further_listeners(plain, None)) == (0, 0, [])
    assert main_port_tls(load_settings(environ=tls))  # as before: the certificate serves mqtt_port
    both = load_settings(environ={**tls, "IOTVAULT_MQTT_TLS_PORT": "8883", "IOTVAULT_MQTT_WS_PORT": "8884"})
    assert not main_port_tls(both)  # mqtt_port stays plain
    context = object()
    listeners = further_listeners(both, context)  # type: ignore[arg-type]
    assert [(x.port, x.ssl is context, x.websocket) for x in listeners] == [
        (8883, True, False),
        (8884, True, True),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IOTVAULT_AUTH_CACHE_TTL_S", "-1"),
        ("IOTVAULT_AUTH_CACHE_TTL_S", "301"),
        ("IOTVAULT_READ_CACHE_MIB", "-1"),
        ("IOTVAULT_READ_CACHE_MIB", "4097"),
        ("IOTVAULT_HTTP_PARSER", "llhttp"),
        ("IOTVAULT_EVENT_LOOP", "trio"),
        ("IOTVAULT_DATABASE_POOL_SIZE", "501"),
        ("IOTVAULT_DATABASE_POOL_OVERFLOW", "-1"),
    ],
)
def test_the_read_and_serving_settings_refuse_what_is_out_of_bounds(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={name: value})
    assert name in str(err.value)  # the message names the setting


def test_the_read_and_serving_settings_default_to_the_measured_choices() -> None:
    s = load_settings(environ={})
    assert (s.auth_cache_ttl_s, s.read_cache_mib, s.http_parser, s.event_loop) == (
        5.0,
        64,
        "httptools",
        "uvloop",
    )
    assert (s.database_pool_size, s.database_pool_overflow) == (0, 5)  # 0: by the node's role


def test_no_proxy_is_trusted_by_default_and_named_ones_are_read_as_uvicorn_compares_them() -> None:
    assert load_settings(None, {}).trusted_proxy_list == []
    named = load_settings(None, {"IOTVAULT_TRUSTED_PROXIES": " 127.0.0.1, 10.1.2.3/8 ,,::1, fd00::7/64"})
    assert named.trusted_proxy_list == ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/64"]


@pytest.mark.parametrize("value", ["nginx.internal", "*", "10.0.0.0/33", "127.0.0.1:8080", "1.2.3"])
def test_a_trusted_proxy_that_is_not_an_address_or_network_is_refused(value: str) -> None:
    err = load_error(environ={"IOTVAULT_TRUSTED_PROXIES": f"127.0.0.1,{value}"})
    assert "TRUSTED_PROXIES" in str(err).upper()
    assert repr(value) in str(err)
