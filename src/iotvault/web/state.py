"""What the web application keeps per app: its sessions and its OAuth client."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from iotvault.web.client import CLIENT_ID, WebClient
from iotvault.web.session import SessionStore


@dataclass
class WebState:
    sessions: SessionStore
    client: WebClient

    def anonymous_allowed(self) -> bool:
        found = self.client.identity.provider.store.get_client(CLIENT_ID)
        return found is not None and found[0].allow_anonymous


def web_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state
