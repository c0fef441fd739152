"""Who is calling and what they may do, without any web framework.

:mod:`.tokens` verifies bearer tokens (JWT access and ID tokens) from iotvault's own OpenID
Connect provider or a configured external issuer; :mod:`.policy` is the one authorization
policy. The HTTP layer (:mod:`iotvault.api`) only translates headers into calls to these
modules and their errors into problem responses.
"""
