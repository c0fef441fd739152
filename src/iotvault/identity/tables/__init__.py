"""The provider's tables, one store per aggregate; :class:`iotvault.identity.store.IdentityStore`
is all of them on one engine.

- :mod:`.clients` — OAuth clients and the provider's signing keys;
- :mod:`.sessions` — browser sessions, pending authorization requests, the users' state;
- :mod:`.grants` — authorization codes, grants (token families) and refresh tokens;
- :mod:`.device_codes` — device authorization (RFC 8628);
- :mod:`.events` — identity events (logins, refusals), which the login throttle counts.
"""
