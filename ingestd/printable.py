"""Text from devices, made safe to show to a person.

A sensor id, topic or payload is whatever a device sent. Shown raw in a
terminal, a control character moves the cursor or recolours the screen, and a
Unicode format character (U+202E RIGHT-TO-LEFT OVERRIDE, U+2066 isolates,
U+200B zero width space, U+FEFF …) reorders or hides what follows it, so one
device id can make a table or a log line say something else. Every output
meant for people (tables, console log lines, `explain`) goes through
`printable`; machine formats (JSON, CSV, JSON logs) keep the exact text.

This module imports nothing of ingestd's, so the logger, the store's CLI
queries and the command line can all use it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Cc: C0 and C1 controls and DEL. Cf: bidirectional overrides and isolates,
# zero-width characters, BOM, tags. Zl/Zp: U+2028/U+2029 break lines like \n.
# Cs: lone surrogates (from undecodable bytes) cannot even be written to UTF-8.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


class _Escapes(dict[int, str]):
    """A `str.translate` table filled on first use. Only escaped characters are
    stored (a few thousand code points at most, so the table stays bounded);
    any other character raises LookupError, which leaves it unchanged."""

    def __missing__(self, code: int) -> str:
        ch = chr(code)
        if code != 0x5C and unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
            raise KeyError(code)
        shown = _escape(code)
        self[code] = shown
        return shown


def _escape(code: int) -> str:
    if code == 0x5C:
        return "\\\\"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_TABLE = _Escapes()


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1), format character
    (Unicode category Cf), line/paragraph separator and lone surrogate written
    as a Python-style escape (\\x1b, \\u202e, \\U000e0041), and the backslash
    itself doubled, so that the result is unambiguous: two different inputs
    never look the same. Everything else, other scripts included, is kept."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape, no per-character work
    return text.translate(_TABLE)
