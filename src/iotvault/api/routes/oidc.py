"""The OpenID Connect provider's HTTP endpoints: a thin adapter over :mod:`iotvault.identity`.

Each route copies the request into a :class:`~iotvault.identity.web.Call` (query or form
parameters, ``Authorization``, cookies, the client's address), runs the provider in a worker
thread (it reads the database and checks passwords), and copies the
:class:`~iotvault.identity.web.Answer` into a response. No protocol rule lives here.

Form bodies are parsed here with the standard library rather than by FastAPI: the provider
must see repeated parameters (RFC 6749 3.1 forbids them), and ``python-multipart`` would be a
dependency for nothing. Every route is public by nature and listed in
:data:`iotvault.api.app.PUBLIC_ROUTES`; these are not JSON-API routes, so the ``/iotf``
content rules of :mod:`iotvault.api.middleware` do not apply, but its size limits, rate limits,
security headers and its refusal of credentials in URLs do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from iotvault.api.security import client_address
from iotvault.errors import OAuthError
from iotvault.identity import PATHS, Identity, pages
from iotvault.identity.grants import oauth_error_answer
from iotvault.identity.web import Answer, Call

router = APIRouter(tags=["OpenID Connect"])

FORM: Final = "application/x-www-form-urlencoded"
_MAX_FIELDS: Final = 64


# ---- OpenAPI documentation ------------------------------------------------------------------
def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _redirect(description: str) -> dict[str, Any]:
    return {"description": description, "headers": {"Location": {"schema": {"type": "string"}}}}


_OAUTH_ERROR: Final = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
_TOKEN_RESPONSE: Final = {
    "type": "object",
    "required": ["access_token", "token_type", "expires_in"],
    "properties": {
        "access_token": {"type": "string"},
        "token_type": {"type": "string", "enum": ["Bearer"]},
        "expires_in": {"type": "integer"},
        "scope": {"type": "string"},
        "id_token": {"type": "string"},
        "refresh_token": {"type": "string"},
    },
}
_DEVICE_RESPONSE: Final = {
    "type": "object",
    "required": ["device_code", "user_code", "verification_uri", "expires_in", "interval"],
    "properties": {
        "device_code": {"type": "string"},
        "user_code": {"type": "string"},
        "verification_uri": {"type": "string"},
        "verification_uri_complete": {"type": "string"},
        "expires_in": {"type": "integer"},
        "interval": {"type": "integer"},
    },
}
_PAGE_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: _html("the request is not valid, expired or already used")
}
_CLIENT_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: _json("an OAuth error (RFC 6749 5.2)", _OAUTH_ERROR),
    401: _json("invalid_client: the client did not authenticate (see WWW-Authenticate)", _OAUTH_ERROR),
}


def _query(*names: str) -> dict[str, Any]:
    return {
        "parameters": [
            {"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in names
        ]
    }


def _form(*names: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {n: {"type": "string"} for n in names}}
    return {"requestBody": {"required": False, "content": {FORM: {"schema": schema}}}}


# ---- adapter --------------------------------------------------------------------------------
def identity(request: Request) -> Identity:
    found: Identity = request.app.state.identity
    return found


class _BadForm(Exception):  # noqa: N818 - internal signal, never escapes this module
    pass


async def _call(request: Request, *, form: bool) -> Call:
    """The request's parameters (query, or form body), one value each, repeats noted."""
    if form:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        body = await request.body()
        if media != FORM and (media or body):
            raise _BadForm
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadForm from None
    else:
        text = request.url.query
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:
        raise _BadForm from None
    params: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if name in params:
            repeated.add(name)
        params[name] = value
    return Call(
        params=params,
        repeated=frozenset(repeated),
        method=request.method,
        authorization=request.headers.get("authorization"),
        cookies=dict(request.cookies),
        address=client_address(request),
    )


def respond(answer: Answer) -> Response:
    response = Response(
        answer.body, answer.status, headers=answer.headers, media_type=answer.media_type or None
    )
    for cookie in answer.cookies:
        response.set_cookie(
            cookie.name,
            cookie.value,
            max_age=cookie.max_age,
            path="/",
            secure=cookie.secure,
            httponly=True,
            samesite="lax",
        )
    return response


async def _run(
    request: Request, handler: Callable[[Call], Answer], *, form: bool, on_bad_form: Callable[[], Answer]
) -> Response:
    try:
        call = await _call(request, form=form)
    except _BadForm:
        return respond(on_bad_form())
    return respond(await run_in_threadpool(handler, call))


def _bad_page() -> Answer:
    return pages.message("Invalid request", f"Send the form as {FORM} in UTF-8.", status=400)


def _bad_oauth() -> Answer:
    return oauth_error_answer(OAuthError("invalid_request", f"send the parameters as {FORM} in UTF-8"))


async def _page(request: Request, handler: Callable[[Call], Answer]) -> Response:
    return await _run(request, handler, form=request.method == "POST", on_bad_form=_bad_page)


async def _client_call(request: Request, handler: Callable[[Call], Answer]) -> Response:
    return await _run(request, handler, form=True, on_bad_form=_bad_oauth)


# ---- discovery and keys -----------------------------------------------------------------------
@router.get(
    PATHS["discovery"],
    summary="OpenID Connect discovery document",
    responses={200: _json("the provider's metadata (OpenID Connect Discovery 1.0, RFC 8414)")},
)
async def discovery(request: Request) -> Response:
    return respond(identity(request).provider.discovery())


@router.get(
    PATHS["jwks"],
    summary="The public keys that sign tokens (JWKS, public members only)",
    responses={200: _json("a JSON Web Key Set")},
)
async def jwks(request: Request) -> Response:
    return respond(await run_in_threadpool(identity(request).provider.jwks))


# ---- browser endpoints --------------------------------------------------------------------------
_AUTHORIZE_PARAMS: Final = (
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
    "code_challenge_method", "prompt", "max_age", "idp",
)  # fmt: skip


_AUTHORIZE_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    302: _redirect("to the login page, or back to the client with a code or an error"),
    **_PAGE_ERRORS,
}


@router.get(
    PATHS["authorization"],
    summary="Authorization endpoint (code flow with PKCE S256)",
    responses=_AUTHORIZE_RESPONSES,
    openapi_extra=_query(*_AUTHORIZE_PARAMS),
)
async def authorize(request: Request) -> Response:
    return await _page(request, identity(request).browser.authorize)


@router.post(
    PATHS["authorization"],
    summary="Authorization endpoint, parameters as a form (OpenID Connect Core 3.1.2.1)",
    responses=_AUTHORIZE_RESPONSES,
    openapi_extra=_form(*_AUTHORIZE_PARAMS),
)
async def authorize_form(request: Request) -> Response:
    return await _page(request, identity(request).browser.authorize)


@router.get(
    PATHS["login"],
    summary="The login page (HTML form: username, password)",
    responses={200: _html("the login form"), **_PAGE_ERRORS},
    openapi_extra=_query("request", "error"),
)
async def login_page(request: Request) -> Response:
    return await _page(request, identity(request).browser.login_page)


@router.post(
    PATHS["login"],
    summary="Log in (the login form's POST); answers 303",
    status_code=303,
    responses={303: _redirect("to the client with a code, or back to the login page"), **_PAGE_ERRORS},
    openapi_extra=_form("request", "csrf_token", "username", "password", "action"),
)
async def login(request: Request) -> Response:
    return await _page(request, identity(request).browser.login)


@router.get(
    PATHS["end_session"],
    summary="End session (RP-initiated logout)",
    responses={
        200: _html("signed out, or a confirmation form"),
        302: _redirect("to the registered post_logout_redirect_uri"),
        **_PAGE_ERRORS,
    },
    openapi_extra=_query("id_token_hint", "client_id", "post_logout_redirect_uri", "state"),
)
async def logout_page(request: Request) -> Response:
    return await _page(request, identity(request).browser.logout)


@router.post(
    PATHS["end_session"],
    summary="End session (form post, or the confirmation form)",
    responses={
        200: _html("signed out, or a confirmation form"),
        303: _redirect("to the registered post_logout_redirect_uri"),
        **_PAGE_ERRORS,
    },
    openapi_extra=_form(
        "id_token_hint", "client_id", "post_logout_redirect_uri", "state", "csrf_token", "confirm"
    ),
)
async def logout(request: Request) -> Response:
    return await _page(request, identity(request).browser.logout)


@router.get(
    PATHS["device"],
    summary="Device verification page (RFC 8628): enter the code a device shows",
    responses={200: _html("the code form, or the outcome"), **_PAGE_ERRORS},
    openapi_extra=_query("user_code", "error", "result"),
)
async def device_page(request: Request) -> Response:
    return await _page(request, identity(request).browser.device_page)


@router.post(
    PATHS["device"],
    summary="Submit a device's user code; answers 303",
    status_code=303,
    responses={303: _redirect("to the login page or the confirmation page"), **_PAGE_ERRORS},
    openapi_extra=_form("user_code", "csrf_token"),
)
async def device_submit(request: Request) -> Response:
    return await _page(request, identity(request).browser.device_submit)


@router.get(
    PATHS["device_confirm"],
    summary="Allow or deny a device",
    responses={200: _html("the confirmation form"), 302: _redirect("to the login page"), **_PAGE_ERRORS},
    openapi_extra=_query("request"),
)
async def device_confirm_page(request: Request) -> Response:
    return await _page(request, identity(request).browser.device_confirm_page)


@router.post(
    PATHS["device_confirm"],
    summary="Allow or deny a device; answers 303",
    status_code=303,
    responses={303: _redirect("to the outcome page"), **_PAGE_ERRORS},
    openapi_extra=_form("request", "csrf_token", "decision"),
)
async def device_confirm(request: Request) -> Response:
    return await _page(request, identity(request).browser.device_confirm)


# ---- client endpoints ---------------------------------------------------------------------------
_TOKEN_FIELDS: Final = (
    "grant_type", "code", "redirect_uri", "code_verifier", "refresh_token", "scope", "device_code",
    "client_id",
)  # fmt: skip


@router.post(
    PATHS["token"],
    summary="Token endpoint: authorization_code (PKCE), refresh_token (rotating), device_code",
    responses={200: _json("tokens", _TOKEN_RESPONSE), **_CLIENT_ERRORS},
    openapi_extra=_form(*_TOKEN_FIELDS),
)
async def token(request: Request) -> Response:
    return await _client_call(request, identity(request).grants.token)


@router.post(
    PATHS["device_authorization"],
    summary="Device authorization endpoint (RFC 8628)",
    responses={200: _json("a device code and a user code", _DEVICE_RESPONSE), **_CLIENT_ERRORS},
    openapi_extra=_form("client_id", "scope"),
)
async def device_authorization(request: Request) -> Response:
    return await _client_call(request, identity(request).grants.device_authorization)


@router.post(
    PATHS["revocation"],
    summary="Token revocation (RFC 7009): ends the token's whole grant",
    responses={200: _json("revoked, or nothing to revoke"), **_CLIENT_ERRORS},
    openapi_extra=_form("token", "token_type_hint", "client_id"),
)
async def revoke(request: Request) -> Response:
    return await _client_call(request, identity(request).grants.revoke)


_USERINFO_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: _json("claims about the token's subject"),
    401: _json("no or invalid access token (see WWW-Authenticate)", _OAUTH_ERROR),
    403: _json("the token lacks the openid scope", _OAUTH_ERROR),
}


async def _userinfo(request: Request) -> Response:
    return respond(await identity(request).userinfo(request.headers.get("authorization")))


@router.get(
    PATHS["userinfo"], summary="UserInfo endpoint (Bearer access token)", responses=_USERINFO_RESPONSES
)
async def userinfo_get(request: Request) -> Response:
    return await _userinfo(request)


@router.post(
    PATHS["userinfo"], summary="UserInfo endpoint (Bearer access token)", responses=_USERINFO_RESPONSES
)
async def userinfo_post(request: Request) -> Response:
    return await _userinfo(request)


# (method, path) of every route above, for iotvault.api.app.PUBLIC_ROUTES: read off the router,
# so that a route added here cannot be left out of the list
OIDC_ROUTES: Final = frozenset(
    (method, route.path)
    for route in router.routes
    if isinstance(route, APIRoute)
    for method in route.methods or ()
)
