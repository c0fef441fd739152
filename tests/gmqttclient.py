"""A gmqtt client for broker tests: never reconnects, keeps what it saw."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

HOST = "127.0.0.1"
NEVER = -2  # gmqtt: no automatic reconnection


class GmqttClient:
    """A gmqtt client that never reconnects, keeping what it saw."""

    def __init__(self, client_id: str) -> None:
        self.client = gmqtt.Client(client_id, clean_session=True)
        self.client.set_config({"reconnect_retries": NEVER})
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.subacks: asyncio.Queue[tuple[int, ...]] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _mid, qos, _p: self.subacks.put_nowait(tuple(qos))
        self.client.on_disconnect = lambda *_a: self.disconnected.set()

    def _on_message(self, _c: Any, topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        self.messages.put_nowait((topic, payload))
        return 0

    async def connect(self, port: int, username: str | None, password: str | None) -> None:
        if username is not None:
            self.client.set_auth_credentials(username, password)
        await asyncio.wait_for(self.client.connect(HOST, port, version=MQTTv311, keepalive=30), 5)

    async def subscribe(self, topic_filter: str) -> tuple[int, ...]:
        self.client.subscribe(topic_filter, qos=1)
        return await asyncio.wait_for(self.subacks.get(), 5)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 2)
