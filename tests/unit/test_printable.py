"""`printable`: device text made safe for people, without making two texts look alike."""

from __future__ import annotations

import re
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.printable import printable

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _unescape(shown: str) -> str:
    """The inverse of `printable`: proof that nothing is lost or confused."""

    def one(m: re.Match[str]) -> str:
        body = m[1]
        return "\\" if body == "\\" else chr(int(body[1:], 16))

    rest = _ESCAPE.sub("", shown)
    assert "\\" not in rest, f"a backslash that starts no escape in {shown!r}"
    return _ESCAPE.sub(one, shown)


# Text as a device might send it, weighted towards the characters that matter.
_NASTY = st.sampled_from(
    [
        "\u202a",
        "\u202b",
        "\u202c",
        "\u202d",
        "\u202e",
        "\u2066",
        "\u2067",
        "\u2068",
        "\u2069",
        "\u200b",
        "\u200e",
        "\u200f",
        "\ufeff",
        "\u061c",
        "\U000e0041",
        "\x00",
        "\x1b",
        "\n",
        "\r",
        "\x7f",
        "\x85",
        "\x9b",
        "\u2028",
        "\u2029",
        "\\",
        "\\u202e",
        "\\x1b",
    ]
)
_TEXT = st.lists(st.one_of(_NASTY, st.text(max_size=5)), max_size=12).map("".join)


@settings(max_examples=500)
@given(_TEXT)
def test_output_never_holds_a_control_or_format_character(text: str) -> None:
    shown = printable(text)
    assert not any(unicodedata.category(c) in _UNSAFE for c in shown), repr(shown)


@settings(max_examples=500)
@given(_TEXT)
def test_escaping_is_reversible(text: str) -> None:
    assert _unescape(printable(text)) == text


@settings(max_examples=500)
@given(_TEXT, _TEXT)
def test_two_different_ids_never_look_the_same(a: str, b: str) -> None:
    if a != b:
        assert printable(a) != printable(b)


def test_examples() -> None:
    assert printable("kitchen") == "kitchen"
    assert printable("Küche/温度 é") == "Küche/温度 é"  # other scripts are kept
    assert printable("abc\u202edef") == "abc\\u202edef"
    assert printable("a\u2066b\u2069") == "a\\u2066b\\u2069"
    assert printable("\ufeffid\u200b") == "\\ufeffid\\u200b"
    assert printable("\U000e0041") == "\\U000e0041"  # a tag character
    assert printable("\x85\x9b") == "\\x85\\x9b"  # C1 controls
    assert printable("a\u2028b") == "a\\u2028b"
    # A literal backslash is doubled: the text `\u202e` is not the character.
    assert printable("\\u202e") == "\\\\u202e"
    assert printable("\udcff") == "\\udcff"  # a lone surrogate, unwritable as UTF-8
    assert printable("a b\u00a0c") == "a b\u00a0c"  # spaces are not format characters


def test_the_console_log_escapes_every_text_value() -> None:
    import io
    import json

    import structlog

    from ingestd.observe.log import configure_logging

    out = io.StringIO()
    configure_logging("info", "console", out)
    structlog.get_logger("t").info("reading \u202e", sensor="ab\u202ecd\x1b[2J", n=1)
    line = out.getvalue()
    assert "\u202e" not in line
    assert "\x1b" not in line
    assert "ab\\u202ecd\\x1b[2J" in line
    assert "reading \\u202e" in line

    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger("t").info("reading", sensor="ab\u202ecd")
    text = out.getvalue()
    assert text.isascii()
    assert json.loads(text)["sensor"] == "ab\u202ecd"  # exact in the machine format
