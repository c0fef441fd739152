"""What a person's browser sees: authorization, the login page, logout, device verification.

**Authorization** (``GET /oauth/authorize``, OpenID Connect Core 3.1 with RFC 9700's advice):
``response_type=code`` only, so the implicit flow (``token``, ``id_token``) is refused; PKCE
with ``S256`` only — ``plain`` is refused from everyone, and a public client without a
``code_challenge`` is refused; the ``redirect_uri`` must equal a registered one character for
character. Until the client and its redirect URI are known good, errors are shown as a page and
never redirected anywhere (no open redirect); after that they go back to the client with
``error``, ``state`` and ``iss`` (RFC 9207, against mix-up attacks). A browser with a session
gets a code at once, unless ``prompt=login`` or ``max_age`` asks for a fresh login;
``prompt=none`` without one answers ``login_required``.

**Login** (``/login``): the pending request is stored server-side and the page knows only its
id, so the form cannot be pointed anywhere else. The POST checks the CSRF token, the throttle
and the password, and always answers ``303 See Other``: to the client with the code, or back to
the page with a message that is the same for an unknown user name, a wrong password and a
disabled account (whose checks cost the same argon2 time, see :func:`iotvault.accounts.authenticate`).
A successful login always starts a new session (no session fixation).

**Anonymous login** ("proceed anonymously" in App ID's SDK): the login page's second button, or
``idp=anonymous`` on the authorization request, for clients registered with it. No session is
made; the code's tokens carry ``amr: ["anon"]`` and a random subject, and the API grants them
only what a group named ``anonymous`` grants. Rate-limited per address.

**Logout** (``/oauth/logout``, OpenID Connect RP-Initiated Logout): with a valid
``id_token_hint`` it ends that login's session and revokes every grant made in it; without one
it asks the person first (a CSRF-protected form). ``post_logout_redirect_uri`` must be one the
client registered.

**Device verification** (``/device``, RFC 8628 3.3): the person types the code the device
shows, logs in if needed, and allows or denies on a page that names the client and repeats the
code. Wrong codes are counted per address.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Final

from iotvault.accounts import authenticate
from iotvault.clock import now_us
from iotvault.crypto.passwords import verify_password
from iotvault.domain.accounts import MAX_PASSWORD
from iotvault.errors import OAuthError
from iotvault.identity import pages
from iotvault.identity.minting import anonymous_subject
from iotvault.identity.provider import REQUEST_TTL_S, IdentityProvider
from iotvault.identity.records import Authentication, AuthRequestRecord, ClientRecord, SessionRecord
from iotvault.identity.requests import (
    MAX_STATE,
    AuthorizationRequest,
    format_user_code,
    normalize_user_code,
    parse_authorization,
)
from iotvault.identity.throttle import ANONYMOUS_LOGIN, DEVICE_CODE_INVALID
from iotvault.identity.web import (
    Answer,
    Call,
    SetCookie,
    csrf_ok,
    csrf_token,
    new_token,
    redirect,
    sha256_hex,
    with_query,
)

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")

LOGIN_MESSAGES: Final = {
    "invalid": "The user name or the password is not right.",
    "locked": "Too many failed attempts with this user name. Try again later.",
    "throttled": "Too many failed attempts from your network. Try again later.",
    "anonymous": "Signing in without an account is not possible right now. Try again later.",
}
DEVICE_MESSAGES: Final = {
    "invalid": "That code is not valid, or it has expired. Check it and try again.",
    "throttled": "Too many wrong codes from your network. Try again later.",
}
OPENED_DIRECTLY = (
    "This is iotvault's sign-in page. Applications send you here when they need you to sign in, "
    "so there is nothing to do on it by itself: open the application (or run 'iotvault login' "
    "in a terminal) and it will bring you back here."
)
EXPIRED = "This sign-in request has expired or was already used. Go back to the application and start again."


class Browser:
    def __init__(self, idp: IdentityProvider) -> None:
        self.idp = idp

    # ---- helpers -------------------------------------------------------------------------
    def _pending(self, request_id: str | None, kind: str | None = None) -> AuthRequestRecord | None:
        if request_id is None or not _REQUEST_ID_RE.fullmatch(request_id):
            return None
        record = self.idp.store.get_auth_request(request_id)
        if record is None or record.completed_us is not None or record.expires_us <= now_us():
            return None
        return record if kind is None or record.kind == kind else None

    def _who_of(self, session: SessionRecord) -> Authentication | None:
        who = self.idp.login_as(session.user_name)
        if who is None or who.user_stamp != session.user_stamp:
            return None
        return replace(who, amr=session.amr, auth_time_us=session.auth_time_us, session_id=session.session_id)

    def _code_redirect(
        self, client: ClientRecord, request: AuthorizationRequest, who: Authentication, status: int
    ) -> Answer:
        code = self.idp.issue_code(
            client,
            redirect_uri=request.redirect_uri,
            scope=request.scope,
            code_challenge=request.code_challenge,
            nonce=request.nonce,
            who=who,
        )
        return redirect(
            with_query(request.redirect_uri, {"code": code, "state": request.state, "iss": self.idp.issuer}),
            status,
        )

    def _error_redirect(
        self, redirect_uri: str, state: str | None, error: str, description: str, status: int = 302
    ) -> Answer:
        return redirect(
            with_query(
                redirect_uri,
                {"error": error, "error_description": description, "state": state, "iss": self.idp.issuer},
            ),
            status,
        )

    # ---- authorization endpoint ----------------------------------------------------------
    def _registered(self, call: Call) -> tuple[ClientRecord, str] | Answer:
        """The client and its redirect URI, exactly as registered; else a page, never a redirect."""
        if {"client_id", "redirect_uri"} & call.repeated:
            return pages.message(
                "Invalid request", "client_id and redirect_uri must be given once.", status=400
            )
        client = self.idp.client(call.get("client_id"))
        if client is None:
            return pages.message(
                "Unknown application", "This application is not registered here.", status=400
            )
        redirect_uri = call.get("redirect_uri")
        if redirect_uri is None or redirect_uri not in client.redirect_uris:
            return pages.message(
                "Invalid request",
                "The redirect_uri is missing or not registered for this application.",
                status=400,
            )
        return client, redirect_uri

    def authorize(self, call: Call) -> Answer:
        registered = self._registered(call)
        if isinstance(registered, Answer):
            return registered
        client, redirect_uri = registered
        state = call.get("state")
        if state is not None and len(state) > MAX_STATE:
            state = None  # refused by parse_authorization, and not echoed
        try:
            request = parse_authorization(client, redirect_uri, call)
        except OAuthError as exc:
            return self._error_redirect(redirect_uri, state, exc.error, exc.description)
        if request.anonymous:
            return self._anonymous(client, request, call, 302)
        found = self.idp.live_session(call)
        who = self._who_of(found[0]) if found is not None else None
        if who is not None and not self._needs_login(request, who):
            return self._code_redirect(client, request, who, 302)
        if "none" in request.prompt:
            return self._error_redirect(redirect_uri, state, "login_required", "the user must log in")
        now = now_us()
        pending = AuthRequestRecord(
            request_id=new_token(),
            kind="authorize",
            params=request.as_params(),
            created_us=now,
            expires_us=now + REQUEST_TTL_S * 1_000_000,
            completed_us=None,
        )
        self.idp.store.add_auth_request(pending)
        return redirect(with_query(self.idp.url("login"), {"request": pending.request_id}))

    @staticmethod
    def _needs_login(request: AuthorizationRequest, who: Authentication) -> bool:
        if "login" in request.prompt or "select_account" in request.prompt:
            return True
        if request.max_age is not None:
            return now_us() - who.auth_time_us > request.max_age * 1_000_000
        return False

    def _anonymous(
        self, client: ClientRecord, request: AuthorizationRequest, call: Call, status: int
    ) -> Answer:
        if not client.allow_anonymous:
            return self._error_redirect(
                request.redirect_uri,
                request.state,
                "access_denied",
                "anonymous login is not enabled for this client",
                status,
            )
        now = now_us()
        if not self.idp.throttle.anonymous_allowed(call.address, now):
            return self._error_redirect(
                request.redirect_uri,
                request.state,
                "temporarily_unavailable",
                "too many anonymous logins from this address; try again later",
                status,
            )
        who = Authentication(
            subject=anonymous_subject(),
            user_name=None,
            user_stamp=None,
            anonymous=True,
            amr="anon",
            auth_time_us=now,
        )
        self.idp.event(ANONYMOUS_LOGIN, client_id=client.client_id, address=call.address, detail=who.subject)
        return self._code_redirect(client, request, who, status)

    # ---- login page ------------------------------------------------------------------------
    def login_page(self, call: Call) -> Answer:
        pending = self._pending(call.get("request"))
        client = self.idp.client(str(pending.params.get("client_id"))) if pending is not None else None
        if call.get("request") is None:  # opened directly, not sent here by an application
            return pages.message("Sign in from your application", OPENED_DIRECTLY, status=400)
        if pending is None or client is None:
            return pages.message("Sign-in expired", EXPIRED, status=400)
        cookies: list[SetCookie] = []
        secret = self.idp.cookies.browser_secret(call, cookies)
        csrf = csrf_token(secret, "login", pending.request_id)
        action = self.idp.url("login")
        anonymous = pages.Markup("")
        if pending.kind == "authorize" and client.allow_anonymous:
            anonymous = pages.render(
                "login_anonymous.html", action=action, request=pending.request_id, csrf=csrf
            )
        content = pages.render(
            "login.html",
            client=client.display_name,
            alert=pages.alert(LOGIN_MESSAGES.get(call.get("error") or "")),
            action=action,
            request=pending.request_id,
            csrf=csrf,
            anonymous=anonymous,
        )
        targets = []
        if pending.kind == "authorize":
            targets.append(pages.form_target(str(pending.params["redirect_uri"])) or "")
        answer = pages.page("Sign in", content, form_targets=targets)
        answer.cookies.extend(cookies)
        return answer

    def login(self, call: Call) -> Answer:
        """The login form's POST: always a 303, unless the form itself is not valid."""
        pending = self._pending(call.get("request"))
        client = self.idp.client(str(pending.params.get("client_id"))) if pending is not None else None
        if pending is None or client is None or call.repeated:
            return pages.message("Sign-in expired", EXPIRED, status=400)
        if not csrf_ok(
            call.cookies.get(self.idp.cookies.browser), call.get("csrf_token"), "login", pending.request_id
        ):
            return pages.message(
                "Sign-in expired",
                "The sign-in form has expired, or your browser does not keep cookies for this site. "
                "Go back to the application and try again.",
                status=400,
            )
        if call.get("action") == "anonymous":
            if pending.kind != "authorize" or not self.idp.store.complete_auth_request(
                pending.request_id, now_us()
            ):
                return pages.message("Sign-in expired", EXPIRED, status=400)
            request = AuthorizationRequest.from_params(pending.params)
            return self._anonymous(client, replace(request, anonymous=True), call, 303)
        checked = self._check_password(call, client)
        if isinstance(checked, str):
            return redirect(
                with_query(self.idp.url("login"), {"request": pending.request_id, "error": checked}), 303
            )
        return self._logged_in(call, pending, client, checked)

    def _check_password(self, call: Call, client: ClientRecord) -> Authentication | str:
        """Who logged in, or the error to show: the same for an unknown user name, a wrong
        password and a disabled account, after the same argon2 work."""
        user_name = call.params.get("username", "")
        password = call.params.get("password", "")
        now = now_us()
        refusal = self.idp.throttle.refusal(user_name, call.address, now)
        if refusal is not None:
            verify_password(None, password[:MAX_PASSWORD])  # the time a check costs, all the same
            self.idp.throttle.refused(user_name, call.address, now, refusal)
            return refusal.value
        if len(password) > MAX_PASSWORD:
            verify_password(None, password[:MAX_PASSWORD])
            user = None
        else:
            user = authenticate(self.idp.ctx, user_name, password)
        who = self.idp.login_as(user.user_name) if user is not None else None
        if who is None:
            locked = self.idp.throttle.failed(user_name, call.address, now, client.client_id)
            return "locked" if locked else "invalid"
        return who

    def _logged_in(
        self, call: Call, pending: AuthRequestRecord, client: ClientRecord, who: Authentication
    ) -> Answer:
        """A new session (never the old one: no fixation), then on with the pending request."""
        previous = self.idp.live_session(call)
        session, token = self.idp.new_session(who, previous[0] if previous is not None else None)
        who = replace(who, session_id=session.session_id)
        self.idp.event(
            "login_succeeded", user_name=who.user_name, client_id=client.client_id, address=call.address
        )
        if pending.kind == "device":
            answer = redirect(
                with_query(self.idp.url("device_confirm"), {"request": pending.request_id}), 303
            )
        elif not self.idp.store.complete_auth_request(pending.request_id, now_us()):
            answer = pages.message("Sign-in expired", EXPIRED, status=400)
        else:
            answer = self._code_redirect(client, AuthorizationRequest.from_params(pending.params), who, 303)
        answer.cookies.append(self.idp.cookies.set_session(token))
        return answer

    # ---- logout (RP-initiated) -----------------------------------------------------------
    def logout(self, call: Call) -> Answer:
        hint = call.get("id_token_hint")
        claims = self.idp.decode_own(hint) if hint is not None else None
        checked = self._logout_target(call, claims)
        if isinstance(checked, Answer):
            return checked
        client, target = checked
        found = self.idp.live_session(call)
        confirmed = (
            call.method == "POST"
            and call.get("confirm") == "yes"
            and csrf_ok(call.cookies.get(self.idp.cookies.browser), call.get("csrf_token"), "logout")
        )
        if claims is None and not confirmed and found is not None:
            return self._logout_form(call, found[0], client, target)
        ended_user = self._end_hinted(claims)
        clear = found is None
        if found is not None and (confirmed or (ended_user is not None and found[0].user_name == ended_user)):
            self.idp.store.end_session(found[0].session_id, now_us(), "logout")
            ended_user, clear = found[0].user_name, True
        if ended_user is not None:
            self.idp.event(
                "logout",
                user_name=ended_user,
                client_id=client.client_id if client else None,
                address=call.address,
            )
        state = call.get("state")
        answer = (
            redirect(with_query(target, {"state": state}), 303 if call.method == "POST" else 302)
            if target is not None
            else pages.message("Signed out", "You are signed out of iotvault.")
        )
        if clear:
            answer.cookies.append(self.idp.cookies.clear_session())
        return answer

    def _logout_target(
        self, call: Call, claims: dict[str, Any] | None
    ) -> tuple[ClientRecord | None, str | None] | Answer:
        """The client asking, and the registered URI to send the browser to afterwards."""
        hinted: str | None = None
        if claims is not None:
            aud = claims.get("aud")
            hinted = aud if isinstance(aud, str) else (aud[0] if isinstance(aud, list) and aud else None)
        client_id = call.get("client_id")
        if client_id is not None and hinted is not None and client_id != hinted:
            return pages.message("Invalid request", "client_id does not match the id_token_hint.", status=400)
        client = self.idp.client(client_id or hinted)
        target = call.get("post_logout_redirect_uri")
        if target is not None and (client is None or target not in client.post_logout_redirect_uris):
            return pages.message(
                "Invalid request",
                "The post_logout_redirect_uri is not registered for this application.",
                status=400,
            )
        return client, target

    def _logout_form(
        self, call: Call, session: SessionRecord, client: ClientRecord | None, target: str | None
    ) -> Answer:
        cookies: list[SetCookie] = []
        secret = self.idp.cookies.browser_secret(call, cookies)
        content = pages.render(
            "logout.html",
            user=session.user_name,
            action=self.idp.url("end_session"),
            csrf=csrf_token(secret, "logout"),
            client_id=client.client_id if client is not None else "",
            post_logout_redirect_uri=target or "",
            state=call.get("state") or "",
        )
        answer = pages.page("Sign out", content)
        answer.cookies.extend(cookies)
        return answer

    def _end_hinted(self, claims: dict[str, Any] | None) -> str | None:
        """End the login an ID token names (its grant and session); who it was, if anyone."""
        grant_id = claims.get("sid") if claims is not None else None
        grant = self.idp.store.get_grant(grant_id) if isinstance(grant_id, str) else None
        if grant is None:
            return None
        now = now_us()
        self.idp.store.revoke_grant(grant.grant_id, now, "logout")
        if grant.who.session_id is not None:
            self.idp.store.end_session(grant.who.session_id, now, "logout")
        return grant.who.user_name or grant.who.subject

    # ---- device verification (RFC 8628, 3.3) ------------------------------------------------
    def device_page(self, call: Call) -> Answer:
        result = call.get("result")
        if result == "approved":
            return pages.message("Device connected", "You may close this page and return to your device.")
        if result == "denied":
            return pages.message("Access denied", "The device was not allowed to sign in.")
        cookies: list[SetCookie] = []
        secret = self.idp.cookies.browser_secret(call, cookies)
        given = call.get("user_code") or ""
        content = pages.render(
            "device.html",
            alert=pages.alert(DEVICE_MESSAGES.get(call.get("error") or "")),
            action=self.idp.url("device"),
            csrf=csrf_token(secret, "device"),
            user_code=given[:16],
        )
        answer = pages.page("Approve a sign-in from a device or terminal", content)
        answer.cookies.extend(cookies)
        return answer

    def device_submit(self, call: Call) -> Answer:
        if not csrf_ok(call.cookies.get(self.idp.cookies.browser), call.get("csrf_token"), "device"):
            return pages.message(
                "Form expired", "The form has expired, or cookies are blocked. Reload the page.", status=400
            )

        def back(error: str) -> Answer:
            return redirect(with_query(self.idp.url("device"), {"error": error}), 303)

        now = now_us()
        if not self.idp.throttle.device_code_allowed(call.address, now):
            return back("throttled")
        code = normalize_user_code(call.get("user_code"))
        record = self.idp.store.device_code_by_user_code(sha256_hex(code)) if code is not None else None
        client = self.idp.client(record.client_id) if record is not None else None
        if (
            code is None
            or record is None
            or client is None
            or record.status != "pending"
            or record.expires_us <= now
        ):
            self.idp.event(DEVICE_CODE_INVALID, address=call.address)
            return back("invalid")
        pending = AuthRequestRecord(
            request_id=new_token(),
            kind="device",
            params={
                "client_id": client.client_id,
                "device_code_hash": record.device_code_hash,
                "user_code": format_user_code(code),
            },
            created_us=now,
            expires_us=min(record.expires_us, now + REQUEST_TTL_S * 1_000_000),
            completed_us=None,
        )
        self.idp.store.add_auth_request(pending)
        target = "device_confirm" if self.idp.live_session(call) is not None else "login"
        return redirect(with_query(self.idp.url(target), {"request": pending.request_id}), 303)

    def device_confirm_page(self, call: Call) -> Answer:
        pending = self._pending(call.get("request"), "device")
        if pending is None:
            return pages.message("Request expired", EXPIRED, status=400)
        found = self.idp.live_session(call)
        if found is None:
            return redirect(with_query(self.idp.url("login"), {"request": pending.request_id}))
        client = self.idp.client(str(pending.params["client_id"]))
        record = self.idp.store.device_code(str(pending.params["device_code_hash"]))
        if client is None or record is None or record.status != "pending" or record.expires_us <= now_us():
            return pages.message("Request expired", EXPIRED, status=400)
        cookies: list[SetCookie] = []
        secret = self.idp.cookies.browser_secret(call, cookies)
        content = pages.render(
            "device_confirm.html",
            client=client.display_name,
            user=found[0].user_name,
            user_code=str(pending.params["user_code"]),
            action=self.idp.url("device_confirm"),
            request=pending.request_id,
            csrf=csrf_token(secret, "device-confirm", pending.request_id),
        )
        answer = pages.page("Allow access?", content)
        answer.cookies.extend(cookies)
        return answer

    def device_confirm(self, call: Call) -> Answer:
        pending = self._pending(call.get("request"), "device")
        found = self.idp.live_session(call)
        decision = call.get("decision")
        if (
            pending is None
            or found is None
            or decision not in ("allow", "deny")
            or not csrf_ok(
                call.cookies.get(self.idp.cookies.browser),
                call.get("csrf_token"),
                "device-confirm",
                pending.request_id,
            )
            or not self.idp.store.complete_auth_request(pending.request_id, now_us())
        ):
            return pages.message("Request expired", EXPIRED, status=400)
        session = found[0]
        decided = self.idp.store.decide_device_code(
            str(pending.params["device_code_hash"]),
            approved=decision == "allow",
            user_name=session.user_name,
            user_stamp=session.user_stamp,
            auth_time_us=session.auth_time_us,
        )
        if not decided:
            return pages.message("Request expired", EXPIRED, status=400)
        self.idp.event(
            "device_approved" if decision == "allow" else "device_denied",
            user_name=session.user_name,
            client_id=str(pending.params["client_id"]),
            address=call.address,
        )
        result = "approved" if decision == "allow" else "denied"
        return redirect(with_query(self.idp.url("device"), {"result": result}), 303)
