"""Surfaces print results whatever bytes a file name holds."""

from __future__ import annotations

import json
import os

from pyro_mcp.api.display import printable, printable_text


def test_names_that_are_not_utf8_print_with_their_odd_bytes_escaped() -> None:
    name = os.fsdecode(b"caf\xe9/\xff.txt")
    assert printable_text(name) == "caf\\xe9/\\xff.txt"
    assert printable_text("plain é ✓") == "plain é ✓"  # real text is left alone
    result = {"files": [{"path": name, "size": 3}], name: (name,), "n": 1}
    shown = printable(result)
    assert shown == {
        "files": [{"path": "caf\\xe9/\\xff.txt", "size": 3}],
        "caf\\xe9/\\xff.txt": ["caf\\xe9/\\xff.txt"],
        "n": 1,
    }
    json.dumps(shown).encode("utf-8")  # JSON and terminals take it
    assert printable_text("\ud800") == "?"  # a surrogate no byte stands for
