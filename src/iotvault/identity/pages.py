"""The provider's HTML pages: small templates in ``templates/``, filled in with every value escaped.

``string.Template`` rather than a template engine: six short pages with a handful of fields
each do not justify a dependency, and with one rendering function there is one place where
escaping happens. A value is inserted as is only when it is :class:`Markup`, which only this
module makes (from another rendered template).

The stylesheet is inlined and allowed by its SHA-256 in the Content-Security-Policy, so the
pages run with ``default-src 'none'``: no script, no image, no frame, nothing from elsewhere.
``form-action`` lists this server and, for the login page, where its form's answer redirects
to (browsers apply ``form-action`` to the redirect that follows a form submission).
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable
from functools import cache
from importlib import resources
from string import Template
from typing import Final
from urllib.parse import urlsplit

from iotvault.identity.web import Answer


class Markup(str):
    """Already-escaped HTML (a rendered template)."""

    __slots__ = ()


@cache
def _template(name: str) -> str:
    return (resources.files("iotvault.identity") / "templates" / name).read_text(encoding="utf-8")


def _style() -> str:
    return _template("style.css").strip()


STYLE_HASH: Final = "sha256-" + base64.b64encode(hashlib.sha256(_style().encode()).digest()).decode()


def render(name: str, **values: str | Markup) -> Markup:
    """Fill template ``name``; every value that is not :class:`Markup` is HTML-escaped."""
    safe = {k: v if isinstance(v, Markup) else html.escape(v, quote=True) for k, v in values.items()}
    return Markup(Template(_template(name)).substitute(safe))


def form_target(uri: str) -> str | None:
    """The CSP source expression that allows a redirect to ``uri`` after a form post."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    if parts.scheme:
        return f"{parts.scheme}:"
    return None


def csp(form_targets: Iterable[str] = ()) -> str:
    targets = " ".join(["'self'", *dict.fromkeys(t for t in form_targets if t)])
    return (
        f"default-src 'none'; style-src '{STYLE_HASH}'; form-action {targets}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def page(title: str, content: Markup, *, status: int = 200, form_targets: Iterable[str] = ()) -> Answer:
    body = render("page.html", title=title, style=Markup(_style()), content=content)
    return Answer(
        status,
        body.encode("utf-8"),
        "text/html; charset=utf-8",
        {"Content-Security-Policy": csp(form_targets), "Cache-Control": "no-store"},
    )


def message(title: str, text: str, *, status: int = 200) -> Answer:
    return page(title, render("message.html", heading=title, text=text), status=status)


def alert(text: str | None) -> Markup:
    return Markup(f'<p class="alert" role="alert">{html.escape(text)}</p>') if text else Markup("")
