"""Response and request models shared by the routers, and the documented error answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None


def _problem(description: str) -> dict[str, Any]:
    return {"model": ProblemOut, "description": description, "content": {"application/problem+json": {}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("bad request, e.g. credentials in the URL"),
    401: _problem("missing or invalid credentials (see WWW-Authenticate)"),
    403: _problem("authenticated, but not allowed"),
    404: _problem("not found, or not visible to the caller"),
    406: _problem("the Accept header excludes what this endpoint produces"),
    409: _problem("conflict, e.g. the name is taken"),
    413: _problem("request body too large"),
    415: _problem("the body must be application/json"),
    422: _problem("invalid parameters or body"),
    429: _problem("rate limited (see Retry-After)"),
    503: _problem("a backing service is unavailable"),
}


class DeviceOut(BaseModel):
    deviceId: str
    typeId: str
    status: str
    lastSeen: str | None
    metadata: dict[str, Any]
    commandDelivery: Literal["signed", "unsigned"] = Field(
        "signed", description="how commands reach the device: signed (default) or unsigned"
    )


class EventOut(BaseModel):
    eventId: str
    deviceId: str
    typeId: str
    eventType: str
    format: str
    timestamp: str | None
    payload: Any = Field(
        description="the JSON the device sent; for another format than json, a string (see "
        "payloadEncoding); null if the record does not decrypt"
    )
    error: str | None = None
    payloadEncoding: Literal["text", "base64"] | None = Field(
        None,
        description="only for events whose format is not json: `text` (the payload as sent, a "
        "text format in valid UTF-8) or `base64` (its bytes)",
    )


class Strict(BaseModel):
    """Request bodies refuse unknown fields: no mass assignment (roles, groups) by accident."""

    model_config = ConfigDict(extra="forbid")
