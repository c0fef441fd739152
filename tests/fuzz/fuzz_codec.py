"""Coverage-guided fuzzing of the embedded broker's packet decoder (atheris / libFuzzer).

Run by ``make fuzz`` (10 minutes) and briefly by ``tests/unit/test_fuzz_codec.py``. Any input
must either be refused with ``MalformedPacketError`` or decode to a packet that encodes back to
exactly the same bytes (the codec knows one spelling of each packet); anything else — another
exception, a different re-encoding, a header size that disagrees — is a finding.

Every input also goes through the MQTT 5 decoder (``codec5.decode5``) and, through it, the
translation an MQTT 5 connection applies (``mqtt5.V5Session``): it must refuse with
``MalformedPacketError`` or decode to a packet whose encoding decodes to the same packet (MQTT 5
has more than one spelling of an acknowledgement, so bytes need not match), and what it hands
amqtt must be a 3.1.1 packet the 3.1.1 codec accepts.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from iotvault.broker.codec import Connect, MalformedPacketError, decode, encode, fixed_header_size
    from iotvault.broker.codec5 import Connect5, decode5, encode5
    from iotvault.broker.mqtt5 import V5Limits, V5Session

_SESSION = V5Session(Connect5("fuzz"), V5Limits(1 << 20, 64, retain_available=True))


def test_one_input(data: bytes) -> None:
    check_v311(data)
    check_v5(data)


def check_v5(data: bytes) -> None:
    try:
        packet = decode5(data)
    except MalformedPacketError:
        return
    assert decode5(encode5(packet)) == packet, (data, packet)
    try:
        raw, translated = _SESSION.inbound(data)
    except MalformedPacketError:
        return  # a rule of the connection (topic alias, a second CONNECT, ...)
    assert decode(raw) == translated, (data, translated)
    _SESSION.outbound(raw)  # whatever amqtt might echo back re-encodes without error


def check_v311(data: bytes) -> None:
    try:
        size = fixed_header_size(data)
    except MalformedPacketError:
        size = None
    try:
        packet = decode(data)
    except MalformedPacketError:
        return
    assert size is not None
    assert size[0] + size[1] == len(data)
    if isinstance(packet, Connect) and packet.protocol_level != 4:
        return  # another protocol level: only the level is read
    assert encode(packet) == data, (data, packet)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
