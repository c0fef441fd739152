"""Where iotvault reaches past a library's public API: one module per library.

Every use of a library's private names lives in its adapter and nowhere else, each one named,
explained, checked against the installed version at start, and covered by a contract test
(``tests/unit/test_gmqtt_contract.py``) that fails loudly when an upgrade changes it.
"""
