"""The data model's rules as ``Annotated`` types, for the edges that validate declaratively.

API bodies and path parameters (and any other pydantic model) use these instead of writing a
pattern again, so that each rule has one source: the patterns and limits of
:mod:`iotvault.domain.ids` and :mod:`iotvault.domain.accounts`. A route adds its own
``Path(description=...)`` on top: ``Annotated[Identifier, Path(description="deviceId")]``.

Kept apart from :mod:`.ids` because these carry pydantic metadata, and the device SDK, which
imports :mod:`.ids`, should not need pydantic.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

from iotvault.domain.accounts import MAX_PASSWORD, MIN_PASSWORD, NAME_PATTERN
from iotvault.domain.ids import IDENTIFIER_PATTERN, UUID_PATTERN


def whole(pattern: str) -> str:
    """``pattern`` anchored at both ends, as JSON Schema and pydantic want a whole-value match."""
    return f"^{pattern}$"


Identifier = Annotated[str, StringConstraints(pattern=whole(IDENTIFIER_PATTERN))]
"""1-64 of ``A-Z a-z 0-9 . _ -``: ``deviceId``, ``typeId``, ``clientId``, a command's name."""

AccountName = Annotated[str, StringConstraints(pattern=whole(NAME_PATTERN))]
"""1-64 of ``A-Z a-z 0-9 . _ @ -``: ``userName`` and ``groupName``."""

Uuid = Annotated[str, StringConstraints(pattern=whole(UUID_PATTERN))]
"""A canonical lower-case UUID: ``eventId``, ``commandId``."""

Password = Annotated[str, StringConstraints(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]
"""A password a person chooses (:func:`iotvault.domain.accounts.check_password` has the why)."""
