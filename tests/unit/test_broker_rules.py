"""Topic rules, the login throttle, and the dynamic-security role: pure, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotvault.broker.acl import command_filter, device_may, service_may
from iotvault.broker.dynsec import SERVICE_ACLS, device_role_acls
from iotvault.broker.mosquitto_log import MosquittoLogWatcher, parse_line
from iotvault.broker.throttle import LoginThrottle

OWN = "iot-2/type/thermo/id/d1"


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        (f"{OWN}/evt/reading/fmt/json", "publish", True),
        (f"{OWN}/evt/cmdack/fmt/json", "publish", True),
        (f"{OWN}/mon", "publish", True),
        (f"{OWN}/cmd/open/fmt/json", "publish", False),  # only iotvault sends commands
        (f"{OWN}/cmd/open/fmt/text", "publish", False),
        ("iot-2/type/thermo/id/d2/evt/reading/fmt/json", "publish", False),
        ("iot-2/type/other/id/d1/evt/reading/fmt/json", "publish", False),  # its type is part of it
        (f"{OWN}/evt/+/fmt/json", "publish", False),
        (f"{OWN}/other", "publish", False),
        ("$SYS/broker", "publish", False),
        (f"{OWN}/cmd/+/fmt/json", "subscribe", True),
        (f"{OWN}/cmd/open/fmt/json", "subscribe", True),
        (f"{OWN}/cmd/#", "subscribe", False),
        (f"{OWN}/#", "subscribe", False),
        ("#", "subscribe", False),
        ("iot-2/type/+/id/d1/cmd/+/fmt/json", "subscribe", False),
        ("iot-2/type/thermo/id/+/cmd/+/fmt/json", "subscribe", False),
        ("iot-2/type/thermo/id/d2/cmd/+/fmt/json", "subscribe", False),
        (f"{OWN}/evt/+/fmt/json", "subscribe", False),
        ("$SYS/#", "subscribe", False),
        (f"{OWN}/cmd/open/fmt/json", "receive", True),
        (f"{OWN}/cmd/open/fmt/text", "receive", True),  # a command as a Watson application sent it
        (f"{OWN}/cmd/open/fmt/bin", "receive", True),
        ("iot-2/type/thermo/id/d2/cmd/open/fmt/json", "receive", False),
        ("iot-2/type/thermo/id/d2/cmd/open/fmt/text", "receive", False),
        ("iot-2/type/other/id/d1/cmd/open/fmt/text", "receive", False),
        (f"{OWN}/cmd/open/fmt/te+xt", "receive", False),
        (f"{OWN}/evt/reading/fmt/json", "receive", False),
    ],
)
def test_device_rules(topic: str, action: str, allowed: bool) -> None:
    assert device_may("thermo", "d1", topic, action) is allowed  # type: ignore[arg-type]


def test_service_account_only_publishes_commands() -> None:
    assert service_may(f"{OWN}/cmd/open/fmt/json", "publish")
    assert service_may(f"{OWN}/cmd/open/fmt/text", "publish")
    assert not service_may(f"{OWN}/evt/reading/fmt/json", "publish")
    assert not service_may("#", "subscribe")
    assert not service_may(f"{OWN}/cmd/open/fmt/json", "receive")


def test_dynsec_role_grants_what_the_embedded_rules_grant() -> None:
    acls = {(a["acltype"], a["topic"]) for a in device_role_acls("thermo", "d1")}
    assert acls == {
        ("publishClientSend", f"{OWN}/evt/+/fmt/+"),
        ("publishClientSend", f"{OWN}/mon"),
        ("subscribePattern", command_filter("thermo", "d1")),
        ("publishClientReceive", command_filter("thermo", "d1")),
    }
    service = {(a["acltype"], a["topic"]) for a in SERVICE_ACLS}
    assert ("publishClientSend", "iot-2/type/+/id/+/cmd/+/fmt/json") in service
    assert not any(t == "#" for _, t in service)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_per_device_and_address() -> None:
    clock = Clock()
    t = LoginThrottle(per_device=3, per_address=5, window_s=60, clock=clock)
    assert t.blocked("10.0.0.1", "d1") is None
    assert [t.failed("10.0.0.1", "d1") for _ in range(3)] == [False, False, True]
    assert t.blocked("10.0.0.1", "d1") == pytest.approx(60)
    assert t.blocked("10.0.0.2", "d1") is None  # the device from elsewhere is not locked out
    assert t.blocked("10.0.0.1", "d2") is None
    t.failed("10.0.0.1", "d2")
    t.failed("10.0.0.1", "d3")
    # the address has had enough: a client id that failed from it is refused unchecked...
    assert t.blocked("10.0.0.1", "d2") == pytest.approx(60)
    # ...but one that has not been failing (a neighbour behind the same NAT) is still checked
    assert t.blocked("10.0.0.1", "d4") is None
    t.failed("10.0.0.1", "d4")  # its check failed: now it is one of the failing ones
    assert t.blocked("10.0.0.1", "d4") == pytest.approx(60)
    clock.now += 61
    assert t.blocked("10.0.0.1", "d1") is None
    t.failed("10.0.0.1", "d1")
    t.succeeded("10.0.0.1", "d1")
    assert t.blocked("10.0.0.1", "d1") is None


def test_throttle_memory_is_bounded() -> None:
    t = LoginThrottle(per_device=1, per_address=1000, max_keys=10, clock=Clock())
    for i in range(100):
        t.failed(f"10.0.{i // 250}.{i % 250}", "d")
    assert len(t._failures) <= 10


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, object]]] = []

    def record(self, kind: str, subject: str, **detail: object) -> None:
        self.events.append((kind, subject, detail))


def test_mosquitto_log_lines_become_security_events(tmp_path: Path) -> None:
    log = tmp_path / "mosquitto.log"
    log.write_text("1: Sending CONNACK to 10.0.0.9 (0, 5)\n")  # before iotvault started: ignored
    events = Recorder()
    watcher = MosquittoLogWatcher(log, events)  # type: ignore[arg-type]
    watcher._start_at_end()
    with log.open("a") as fh:
        fh.write("2: New connection from 10.0.0.7:5555 on port 8883.\n")
        fh.write("2: Sending CONNACK to 10.0.0.7 (0, 5)\n")
        fh.write("2: Sending CONNACK to d1 (0, 0)\n")
        fh.write("3: Denied PUBLISH from unit-a (d0, q1, r0, m4, 'iot-2/type/t/id/b/mon', ... (2 bytes))\n")
        fh.write("4: Denied PUBLISH from unit-a (d0, q1, r0, m5, 'half")  # not finished yet
    assert watcher.poll() == 2
    with log.open("a") as fh:
        fh.write("/line', ... (9 bytes))\n")
    assert watcher.poll() == 1
    assert events.events == [
        (
            "login_failed",
            "<unknown>",
            {"action": "connect", "reason": "not authorised", "address": "10.0.0.7"},
        ),
        (
            "acl_denied",
            "unit-a",
            {"action": "publish", "reason": "not allowed", "topic": "iot-2/type/t/id/b/mon"},
        ),
        ("acl_denied", "unit-a", {"action": "publish", "reason": "not allowed", "topic": "half/line"}),
    ]
    log.write_text("5: Sending CONNACK to 10.0.0.8 (0, 4)\n")  # rotated (truncated): read from the start
    assert watcher.poll() == 1
    assert parse_line("no such line", events) is False  # type: ignore[arg-type]


def test_connection_limit_fits_the_descriptor_limit() -> None:
    from iotvault.broker.limits import BrokerLimits, fit_to_descriptors  # noqa: PLC0415

    assert fit_to_descriptors(BrokerLimits(max_connections=10_000), soft_limit=1024).max_connections == 896
    assert fit_to_descriptors(BrokerLimits(max_connections=500), soft_limit=1024).max_connections == 500
