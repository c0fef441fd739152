"""The tamper-evident audit log and the alerts derived from it.

- :mod:`iotvault.domain.audit`: records and the hash chain (pure);
- :mod:`iotvault.crypto.audit_signing`: Ed25519-signed checkpoints of the chain's head;
- :mod:`iotvault.storage.audit`: the tables;
- :mod:`iotvault.audit.log`: recording (queued, batched), checkpoints, retention, verification;
- :mod:`iotvault.audit.alerts`: rules that turn signals into one alert per episode (pure);
- :mod:`iotvault.audit.monitor` and :mod:`iotvault.audit.webhook`: stored alerts, deliveries.
"""
