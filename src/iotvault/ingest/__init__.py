"""The ingest path: decode → validate → encrypt → store → acknowledge.

:mod:`.pipeline` is transport-neutral; :mod:`.subscriber` feeds it from an external broker
(MQTT 5, persistent session, PUBACK after commit) and :mod:`iotvault.broker.embedded` from
inside the embedded broker (PUBACK to the device after commit).
"""
