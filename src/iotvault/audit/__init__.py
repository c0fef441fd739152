"""The tamper-evident audit log and the alerts derived from it.

- :mod:`iotvault.audit.chain`: records and the hash chain (pure);
- :mod:`iotvault.audit.checkpoint`: Ed25519-signed heads of the chain;
- :mod:`iotvault.audit.log`: recording (queued, batched), checkpoints, retention, verification;
- :mod:`iotvault.audit.alerts`: rules that turn signals into one alert per episode (pure).

The tables live in :mod:`iotvault.storage.audit`.
"""
