"""Coverage-guided fuzzing of the embedded broker's packet decoder (atheris / libFuzzer).

Run by ``make fuzz`` (10 minutes) and briefly by ``tests/unit/test_fuzz_codec.py``. Any input
must either be refused with ``MalformedPacketError`` or decode to a packet that encodes back to
exactly the same bytes (the codec knows one spelling of each packet); anything else — another
exception, a different re-encoding, a header size that disagrees — is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from iotvault.broker.codec import Connect, MalformedPacketError, decode, encode, fixed_header_size


def test_one_input(data: bytes) -> None:
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
