"""The text repair pass: ``datasets`` refuses a whole file for one invalid UTF-8 byte, and Arrow's JSON
reader for one lone UTF-16 surrogate escape (``"\\ud800"``, which JavaScript and Python's ``json.dumps``
write). Such a file is copied with each of them replaced by U+FFFD (and without a leading byte-order mark);
a clean file costs one decode pass and no copy."""
from __future__ import annotations

import codecs
import gzip
import re
import zlib
from collections.abc import Iterator

# surrogateescape turns each invalid byte into one lone surrogate in this range.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")
_CHUNK = 1 << 22
# A JSON escape sequence: a surrogate pair, a lone surrogate, or any other escape (consumed so that an
# escaped backslash before "ud800" is not read as an escape).
_JSON_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                          r"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\\.")
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]")


def open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def repair_utf8(path: str, dest: str, *, json: bool = False) -> tuple[int, int]:
    """Write `path` (decompressed) to `dest` with each invalid UTF-8 byte replaced by U+FFFD, without a
    leading byte-order mark and, for a JSON file (`json`), with each lone UTF-16 surrogate escape
    (``"\\ud800"``, which no UTF-8 text can hold) replaced by ``\\ufffd``.

    Returns (invalid bytes replaced, lone surrogate escapes replaced), both 0 when nothing was written:
    the file is clean (the common case costs one decode pass and no copy).
    """
    if _is_clean(path, json):
        return 0, 0
    bad = lone = 0
    try:
        with open(dest, "w", encoding="utf-8") as out:
            for text, n_bad, n_lone in _repaired(path, json):
                out.write(text)
                bad, lone = bad + n_bad, lone + n_lone
    except (EOFError, zlib.error) as e:  # truncated after the first invalid byte, which ended _is_clean's pass
        raise ValueError(f"could not read {path}: {type(e).__name__}: {e} (a truncated or corrupt gzip file?)") from e
    return bad, lone


def _is_clean(path: str, json: bool) -> bool:
    """Valid UTF-8 without a byte-order mark (Windows editors write one: it would start the first document)
    and, for JSON (`json`), without a lone surrogate escape."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    hint = False
    try:
        with open_binary(path) as f:
            if f.read(3) == codecs.BOM_UTF8:
                return False
            f.seek(0)
            tail = b""
            while chunk := f.read(_CHUNK):
                decoder.decode(chunk)
                if json and not hint:  # tail: a hint cut by the chunk boundary
                    hint = bool(_SURROGATE_HINT.search(tail + chunk[:8]) or _SURROGATE_HINT.search(chunk))
                    tail = chunk[-8:]
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except (EOFError, OSError, zlib.error) as e:  # truncated or not gzip at all (gzip.BadGzipFile is an OSError)
        raise ValueError(f"could not read {path}: {type(e).__name__}: {e} (a truncated or corrupt gzip file?)") from e
    # Surrogate escapes, maybe all in pairs (an emoji written by json.dumps): look at each.
    return not hint or all(lone == 0 for _, _, lone in _repaired(path, json))


def _repaired(path: str, json: bool) -> Iterator[tuple[str, int, int]]:
    """(text, invalid bytes replaced, lone surrogate escapes replaced) for successive pieces of `path`,
    decoded, its BOM dropped. A JSON file comes in runs of whole lines: JSON strings hold no raw newline, so
    no escape spans two runs."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    first, carry = True, ""
    with open_binary(path) as src:
        while True:
            chunk = src.read(_CHUNK)
            text = decoder.decode(chunk, final=not chunk)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            bad = len(_ESCAPED_BYTES.findall(text))
            text, lone = _ESCAPED_BYTES.sub("\ufffd", text), 0
            if json:
                text = carry + text
                cut = len(text) if not chunk else text.rfind("\n") + 1
                text, carry = text[:cut], text[cut:]
                text, lone = _fix_json_escapes(text)
            yield text, bad, lone
            if not chunk:
                return


def _fix_json_escapes(text: str) -> tuple[str, int]:
    """`text` (JSON) with each lone surrogate escape replaced by ``\\ufffd``, and how many there were."""
    count = 0

    def fix(m: re.Match) -> str:
        nonlocal count
        if len(m[0]) == 6:  # a lone surrogate; pairs are 12 characters, other escapes 2
            count += 1
            return "\\ufffd"
        return m[0]

    return _JSON_ESCAPE.sub(fix, text), count
