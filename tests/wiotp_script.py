"""Runs in the wiotp-sdk environment (tests/wiotp_venv.py), never in .venv: the unmodified SDK.

``python wiotp_script.py device|app CONFIG_JSON`` prints one JSON object per line on stdout:
``{"ready": true}`` once connected and subscribed, then what happened (``published``,
``command``, ``event``), and ends after ``timeout_s`` seconds or once ``stop_after`` of what it
waits for arrived. Logs go to stderr.
"""

import json
import logging
import sys
import threading
import time

import wiotp.sdk.application
import wiotp.sdk.device

logging.basicConfig(stream=sys.stderr, level=logging.INFO)


def say(**what):
    print(json.dumps(what), flush=True)


def options(cfg):
    return {
        "domain": cfg["domain"],
        "logLevel": logging.INFO,
        "mqtt": {
            "port": cfg.get("port", 8883),
            "caFile": cfg["caFile"],
            "cleanStart": True,
            "transport": cfg.get("transport", "tcp"),
        },
    }


def subscribed_event(client):
    """Set once the broker answered a SUBSCRIBE (the SDK's own callback still runs)."""
    event = threading.Event()
    sdk_callback = client.client.on_subscribe

    def on_subscribe(*args):
        sdk_callback(*args)
        event.set()

    client.client.on_subscribe = on_subscribe
    return event


def device(cfg):
    client = wiotp.sdk.device.DeviceClient(
        config={
            "identity": {"orgId": cfg["org"], "typeId": cfg["typeId"], "deviceId": cfg["deviceId"]},
            "auth": {"token": cfg["token"]},
            "options": options(cfg),
        },
        logHandlers=[logging.StreamHandler(sys.stderr)],
    )
    got = []
    done = threading.Event()

    def on_command(cmd):
        got.append(cmd)
        say(command={"commandId": cmd.commandId, "format": cmd.format, "data": cmd.data})
        if len(got) >= cfg.get("stop_after", 1):
            done.set()

    client.commandCallback = on_command
    ready = subscribed_event(client)
    client.connect()
    if not ready.wait(10):
        say(error="no SUBACK for the command subscription")
        return
    say(ready=True)
    for event_id, fmt, data in cfg.get("events", []):
        published = threading.Event()
        client.publishEvent(event_id, fmt, data, qos=1, onPublish=published.set)
        say(published=event_id, acknowledged=published.wait(10))
    done.wait(cfg["timeout_s"])
    client.disconnect()


def app(cfg):
    client = wiotp.sdk.application.ApplicationClient(
        config={
            "identity": {"appId": cfg["appId"]},
            "auth": {"key": cfg["key"], "token": cfg["token"]},
            "options": options(cfg),
        },
        logHandlers=[logging.StreamHandler(sys.stderr)],
    )
    got = []
    done = threading.Event()

    def on_event(event):
        got.append(event)
        say(
            event={
                "typeId": event.typeId,
                "deviceId": event.deviceId,
                "eventId": event.eventId,
                "data": event.data,
            }
        )
        if len(got) >= cfg.get("stop_after", 1_000_000):
            done.set()

    client.deviceEventCallback = on_event
    ready = subscribed_event(client)
    client.connect()
    client.subscribeToDeviceEvents()
    if not ready.wait(10):
        say(error="no SUBACK for the event subscription")
        return
    say(ready=True)
    for type_id, device_id, command, fmt, data in cfg.get("commands", []):
        sent = threading.Event()
        client.publishCommand(type_id, device_id, command, fmt, data, qos=1, onPublish=sent.set)
        say(commanded=command, acknowledged=sent.wait(10))
    done.wait(cfg["timeout_s"])
    client.disconnect()


if __name__ == "__main__":
    role, config = sys.argv[1], json.loads(sys.argv[2])
    started = time.monotonic()
    try:
        {"device": device, "app": app}[role](config)
    except Exception as exc:  # noqa: BLE001 -- the test reads this line, whatever failed
        say(error=f"{type(exc).__name__}: {exc}")
    say(finished=round(time.monotonic() - started, 1))
