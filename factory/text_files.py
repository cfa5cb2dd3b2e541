"""Text checks shared by every reader of user files (training data, evaluation questions and annotations): the
file must be UTF-8, and a text must be valid Unicode (no lone UTF-16 surrogates). Light on purpose: no torch, so
the scoring command can use it."""
from __future__ import annotations

from typing import Callable, Optional

from factory.errors import FactoryError


def read_utf8(path, kind: str = "LLaVA data files",
              name_line: Optional[Callable[[bytes], Optional[str]]] = None) -> str:
    """The file's text; a file that is not UTF-8 is a FactoryError naming the line and column of the first bad byte
    (not a UnicodeDecodeError with a byte offset only). `kind` names the files in the advice ("... must be UTF-8");
    `name_line(raw bytes of the bad line)` may name what that line holds (e.g. "question id 'q7'")."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - line_start + 1
        line_end = raw.find(b"\n", err.start)
        named = name_line(raw[line_start:line_end if line_end >= 0 else len(raw)]) if name_line else None
        holds = f" ({named})" if named else ""
        raise FactoryError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}{holds}, column {column} "
            f"(byte offset {err.start}) cannot be decoded ({err.reason}). {kind} must be UTF-8; convert "
            f"it, e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it was written as Latin-1."
        ) from None


def surrogate_problem(text: str) -> Optional[str]:
    """'holds '\\ud83d' at character 4, a lone UTF-16 surrogate ...' when `text` is not valid Unicode, else None.
    JSON's \\ud83d escapes produce such text when an emoji was cut in half, and tokenizers then fail with
    unrelated errors (a TypeError from the Rust side), so readers check first and name the sample."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"holds {err.object[err.start]!r} at character {err.start + 1}, a lone UTF-16 surrogate that is not "
                f"valid Unicode text (often an emoji cut in half by the tool that wrote the file)")
    return None
