"""Read and write Kaldi-style tables (`text`, `wav.scp`, `utt2spk`, ...) and token lists.

A table has one entry per line: the key (utterance or recording id) is the first field,
separated by spaces or tabs from the value, which is the rest of the line and may be empty.

Files are always read and written as UTF-8, whatever the locale. Reading strips a byte
order mark (U+FEFF) from the first line and the '\\r' of CRLF line endings. A file that is
not valid UTF-8 raises a ValueError naming the file and the line, so a GBK transcript never
turns into mojibake silently.

Public API:
  read_table(path) -> list[tuple[str, str]]
  read_lines(path) -> list[str]       (the UTF-8 line reader under read_table)
  write_table(path, rows)             (atomic: temporary file in the same folder, then os.replace)
  read_token_list(path) -> list[str]  (FunASR tokens.json, or a text file with one token per line)
  atomic_write_text(path, text)       (the atomic UTF-8 write that write_table uses)
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"

# Only ASCII space and tab separate the key from the value, as in Kaldi. A U+3000 or NBSP
# inside a transcript is part of the value, never a field separator.
_LINE = re.compile(r"([^ \t]+)(?:[ \t]+(.*))?")


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}:{line_number}: invalid UTF-8 at byte {error.start} of the line; "
            f"the file must be UTF-8. Convert a copy outside the corpus, e.g. with "
            f"`iconv -f GBK -t UTF-8 {path} > /tmp/{path.name}` (use the encoding it was saved in), "
            "and point the config at the converted corpus"
        ) from None


def read_lines(path: str | Path, lone_cr_ends_line: bool = False) -> list[str]:
    """Read a UTF-8 text file as lines without BOM, '\\n' or '\\r'.

    With `lone_cr_ends_line`, a '\\r' that no '\\n' follows also ends a line (files saved
    with classic Mac line endings). Raises ValueError naming the file and line when a line
    is not valid UTF-8.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]

    if lone_cr_ends_line:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    chunks = data.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()

    lines = []
    for line_number, chunk in enumerate(chunks, start=1):
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        lines.append(_decode_line(chunk, path, line_number))
    return lines


def read_table(path: str | Path) -> list[tuple[str, str]]:
    """Read a Kaldi table as (key, value) pairs in file order.

    The value is the rest of the line after the key and its separating spaces or tabs,
    without trailing spaces or tabs. It is "" when the line contains only the key. Blank
    lines are skipped, and their count is logged as a warning. A key that appears twice
    raises ValueError naming the file and both line numbers. A file whose lines all end
    with a lone '\r' (classic Mac line endings, no '\n' anywhere) is read line by line too.
    """
    path = Path(path)
    rows: list[tuple[str, str]] = []
    first_line_of_key: dict[str, int] = {}
    blank_lines: list[int] = []
    data = path.read_bytes()
    cr_only = data.endswith(b"\r") and b"\n" not in data

    for line_number, line in enumerate(read_lines(path, lone_cr_ends_line=cr_only), start=1):
        stripped = line.strip(" \t")
        if not stripped:
            blank_lines.append(line_number)
            continue

        match = _LINE.fullmatch(stripped)
        key, value = match.group(1), match.group(2) or ""
        if key in first_line_of_key:
            raise ValueError(
                f"{path}:{line_number}: duplicate key {key!r}, first seen on line {first_line_of_key[key]}; "
                "each key must appear once"
            )
        first_line_of_key[key] = line_number
        rows.append((key, value))

    if blank_lines:
        shown = ", ".join(str(n) for n in blank_lines[:10])
        more = ", ..." if len(blank_lines) > 10 else ""
        logger.warning("%s: skipped %d blank lines (lines %s%s)", path, len(blank_lines), shown, more)
    return rows


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` as UTF-8 through a temporary file in the same folder and os.replace.

    A reader sees either the old file or the complete new one, never a partial write.
    The new file gets the usual permissions (0666 minus the umask), not the 0600 of a
    temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def write_table(path: str | Path, rows: Iterable[tuple[str, str]]) -> None:
    """Write (key, value) pairs as a Kaldi table, atomically and in UTF-8.

    A row with an empty value is written as the key alone. Raises ValueError for an empty
    key, a key containing whitespace, or a value containing a line break.
    """
    lines = []
    for key, value in rows:
        if not key or any(ch.isspace() for ch in key):
            raise ValueError(f"invalid table key {key!r} for {path}: a key must be non-empty and contain no whitespace")
        if "\n" in value or "\r" in value:
            raise ValueError(f"invalid value for key {key!r} in {path}: a value must not contain a line break")
        lines.append(f"{key} {value}\n" if value else f"{key}\n")
    atomic_write_text(path, "".join(lines))


def read_token_list(path: str | Path) -> list[str]:
    """Read a model's token list: FunASR `tokens.json` (a JSON list of strings) or a text file.

    A file whose name ends in `.json` is parsed as JSON. Any other file contains one token
    per line (surrounding whitespace stripped, blank lines skipped). Raises ValueError when
    the JSON is not a list of strings.
    """
    path = Path(path)
    if path.suffix == ".json":
        text = "\n".join(read_lines(path))
        try:
            tokens = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error}); expected a list of token strings") from None
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise ValueError(f"{path}: expected a JSON list of token strings")
        return tokens

    return [line.strip() for line in read_lines(path) if line.strip()]
