"""Commands to devices: signed by the platform, verified by the device, answered with a ``cmdack``.

- :mod:`iotvault.domain.commands` — the wire formats (the signed document, the MQTT message,
  the answer), pure; the device SDK (:mod:`iotvault.device`) and the ingest pipeline both read
  them there, below this package.
- :mod:`.keys` — the platform secrets kept in the database wrapped by the master key: the
  Ed25519 command-signing key and the broker service password.
- :mod:`.service` — sending a command (number, sign, record, audit, publish) and reading its
  status.
"""
