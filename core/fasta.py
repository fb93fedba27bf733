"""Streaming FASTA reader that never drops a read silently.

Structural damage (binary data, sequence before the first header, a header with no id, a
corrupt gzip stream) stops the read with a `FastaError` naming the file, the line and what
to do. Damage confined to one record becomes that record's `status`, so the record still
reaches the per-read table with a reason:

- ``empty``: a header with no sequence after it;
- ``invalid_characters``: sequence lines holding something other than letters;
- ``duplicate_id``: an id seen earlier in the run (see `mark_duplicates`). The first record
  with an id is scored; each later one is listed with this status and not scored, because
  output rows are keyed by id and two reads with one id cannot be told apart downstream.

Line width, CRLF, lowercase, blank lines and descriptions after the id are all accepted.
Memory holds one record at a time, whatever the file size.
"""
from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from core.errors import UserError

_LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1))
_WHITESPACE = b" \t\r\n\v\f"
_GZIP_MAGIC = b"\x1f\x8b"


class FastaError(UserError, ValueError):
    """The input cannot be read as FASTA; the message names file, line and fix."""

    def __init__(self, name: str, line: int, problem: str, fix: str) -> None:
        self.name, self.line = name, line
        super().__init__(f"{name}, line {line}: {problem}. {fix}")


@dataclass(frozen=True)
class Record:
    """One FASTA record: id (header up to the first whitespace), letters as in the file."""

    id: str
    sequence: str
    line: int  # 1-based line number of the header
    status: str | None = None  # None when the record can be scored, else the reason why not


def read_fasta(stream: BinaryIO, name: str) -> Iterator[Record]:
    """Yield the records of a plain or gzip FASTA byte stream, in file order."""
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(stream)  # type: ignore[arg-type]
    if stream.peek(2)[:2] == _GZIP_MAGIC:  # type: ignore[attr-defined]
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    yield from _parse(_numbered_lines(stream, name), name)


def open_fasta(path: str) -> Iterator[Record]:
    """Records of a local FASTA file (plain or gzip)."""
    with open(path, "rb") as handle:
        yield from read_fasta(handle, path)


def mark_duplicates(records: Iterable[Record], seen: set[str]) -> Iterator[Record]:
    """Give every repeat of an id already in `seen` the status ``duplicate_id``.

    `seen` is updated in place, so one set spans several input files of a run.
    """
    for record in records:
        if record.id in seen:
            yield replace(record, status="duplicate_id")
        else:
            seen.add(record.id)
            yield record


def _numbered_lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, bytes]]:
    number = 0
    try:
        for number, raw in enumerate(stream, start=1):
            if b"\x00" in raw:
                raise FastaError(
                    name, number, "binary data (a NUL byte) where FASTA text was expected",
                    "Pass a FASTA file (plain text or gzip), not a binary or compressed archive.",
                )
            yield number, raw
    except (OSError, EOFError, zlib.error) as exc:
        raise FastaError(
            name, number + 1, f"the gzip stream is damaged or truncated ({exc})",
            "Re-download or re-compress the file; check it with `gzip -t`.",
        ) from None


def _parse(lines: Iterator[tuple[int, bytes]], name: str) -> Iterator[Record]:
    header: str | None = None
    header_line = 0
    parts: list[bytes] = []
    invalid = False
    for number, raw in lines:
        line = raw.strip(_WHITESPACE)
        if not line:
            continue
        if line.startswith(b">"):
            if header is not None:
                yield _record(header, header_line, parts, invalid)
            header, header_line = _header_id(line, name, number), number
            parts, invalid = [], False
            continue
        if header is None:
            raise FastaError(
                name, number, "sequence data before the first '>' header",
                "A FASTA file starts with a '>id' line; is this FASTA?",
            )
        seq = line.translate(None, _WHITESPACE) if b" " in line or b"\t" in line else line
        if seq.translate(None, _LETTERS):
            invalid = True
        parts.append(seq)
    if header is not None:
        yield _record(header, header_line, parts, invalid)


def _header_id(line: bytes, name: str, number: int) -> str:
    fields = line[1:].split(None, 1)
    if not fields:
        raise FastaError(
            name, number, "a '>' header with no id after it",
            "Give every record an id right after '>' (e.g. '>read_1').",
        )
    try:
        return fields[0].decode("utf-8")
    except UnicodeDecodeError:
        raise FastaError(
            name, number, "the header is not UTF-8 text",
            "Pass a FASTA text file; binary or mis-encoded files cannot be read.",
        ) from None


def _record(header: str, line: int, parts: list[bytes], invalid: bool) -> Record:
    sequence = b"".join(parts)
    if not sequence:
        return Record(header, "", line, "empty")
    text = sequence.decode("latin-1")
    return Record(header, text, line, "invalid_characters" if invalid else None)
