"""Streaming FASTA and FASTQ reader that never drops a read silently.

The format is told by content, not by name: the first line that is not blank (after an
optional UTF-8 byte order mark) starts with '>' for FASTA or '@' for FASTQ. Gzip is told by
its magic bytes and read whole, single-member, multi-member (`cat a.gz b.gz`) and BGZF
alike. Lines may end in LF, CRLF or CR alone (old Mac files); a line break is one of the
three, so line numbers in messages are what an editor shows.

FASTA records are a '>' header and any number of sequence lines of any width; blank lines,
lowercase and whitespace around lines are accepted. FASTQ records are exactly 4 lines:
'@' header, sequence, '+' (any text after it is ignored), quality. Multi-line FASTQ is not
supported. The quality line is checked to be as long as the sequence and otherwise
ignored: the predictor uses bases only. Blank lines are accepted before the first FASTQ
record and after the last, not between records.

Read ids, paired-end mates included (`read_id` is the one place the rule lives):

- the id is the header's first word (up to the first whitespace);
- an id already ending in ``/1`` or ``/2`` is kept as it is;
- otherwise a Casava 1.8+ description, whose first word matches ``[12]:[YN]:<digits>:``
  (``@name 1:N:0:ACGT`` / ``@name 2:N:0:ACGT``), makes the id ``name/1`` / ``name/2``.

- otherwise, in one of the two files of a pair told by their names (``SRR1_1.fastq`` and
  ``SRR1_2.fastq``; the job decides which files those are), ``/1`` or ``/2`` by the file
  (`with_mate`): SRA's dumps write one header for both mates.

So the two files of a pair give distinct ids and both mates are scored; the same id with
the same mate twice is still a duplicate.

Structural damage (binary data, text that is neither FASTA nor FASTQ, a header with no id,
a FASTQ record that is not 4 well-formed lines, a corrupt gzip stream) stops the read with a
`ReadsError` naming the file, the line and what to do. Damage confined to one record
becomes that record's `status`, so the record still reaches the per-read table:

- ``empty``: a header with no sequence after it;
- ``invalid_characters``: a sequence holding something other than letters;
- ``duplicate_id``: an id seen earlier in the run (the job marks it: job/plan.py's
  `shard_records` with job/seen.py; `mark_duplicates` does it over one stream). The first record
  with an id is scored; each later one is listed with this status and not scored, because
  output rows are keyed by id and two reads with one id cannot be told apart downstream.

Speed: a block (1 MiB) is split into lines at once; a block of well-formed FASTQ or
one-line FASTA takes a bulk path (ids found with numpy by `read_ids`, records built by
`map`), anything else the line-by-line path, which also finds and words every error.
Gzip is inflated with isal (ISA-L), about 3x Python's zlib. Memory holds one block and
its records, whatever the file size. `core.scan.RecordScanner` finds the same records
(offsets, line numbers, ids) without parsing them and raises the same errors; the two are
tested to agree.
"""
from __future__ import annotations

import functools
import io
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import chain, repeat
from operator import itemgetter
from typing import BinaryIO

import numpy as np
from isal import igzip, isal_zlib

from core.errors import UserError

BLOCK = 1 << 20  # bytes read at a time
BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
WHITESPACE = b" \t\v\f"  # whitespace inside a line (line breaks are never part of a line)
_CASAVA = re.compile(rb"[12]:[YN]:[0-9]+:")
_MATES = (b"/1", b"/2")
_MATE_SUFFIXES = (b"", b"/1", b"/2")
_WHITE = np.zeros(256, dtype=bool)  # byte -> is WHITESPACE
_WHITE[list(WHITESPACE)] = True
_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_MATE_DIGIT = np.zeros(256, dtype=bool)
_MATE_DIGIT[[ord("1"), ord("2")]] = True
_FIRST_BYTE = itemgetter(slice(0, 1))

# Formats recognised by their first bytes, with what to do about each.
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG", "a PNG image", "Pass the reads file (FASTA or FASTQ, plain or gzip)."),
    (b"%PDF", "a PDF document", "Pass the reads file (FASTA or FASTQ, plain or gzip)."),
    (b"PK\x03\x04", "a zip archive", "Unzip it and pass the FASTA or FASTQ files inside."),
    (b"BZh", "bzip2-compressed data", "Decompress it with bunzip2, or recompress with gzip."),
    (b"\xfd7zXZ\x00", "xz-compressed data", "Decompress it with unxz, or recompress with gzip."),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "Decompress it with `zstd -d`, or recompress with gzip."),
    (b"BAM\x01", "a BAM file (binary alignments)", "Convert it to FASTQ first: `samtools fastq in.bam > reads.fastq`."),
    (b"CRAM", "a CRAM file (binary alignments)", "Convert it to FASTQ first: `samtools fastq in.cram > reads.fastq`."),
    (b"NCBI.sra", "an SRA archive", "Extract the reads first: `fasterq-dump run.sra`."),
    (b"\x89HDF", "an HDF5 file (e.g. FAST5 raw signal)", "Basecall it first and pass the FASTQ output."),
    (b"\x7fELF", "an executable", "Pass the reads file (FASTA or FASTQ, plain or gzip)."),
)


class ReadsError(UserError, ValueError):
    """The input cannot be read as FASTA or FASTQ; the message names file, line and fix."""

    def __init__(self, name: str, line: int, problem: str, fix: str) -> None:
        self.name, self.line = name, line
        super().__init__(f"{name}, line {line}: {problem}. {fix}")


@dataclass(slots=True)
class Record:
    """One read: output id (after the mate rule), letters as in the file.

    Not frozen: the reader makes one per read, 10^8 a run, and a frozen dataclass costs
    three times as much to build. Treat it as a value; `dataclasses.replace` makes changed
    copies.
    """

    id: str
    sequence: str
    line: int  # 1-based line number of the header
    status: str | None = None  # None when the record can be scored, else the reason why not


def read_id(header: bytes) -> bytes:
    """The output id of a header line given without its '>'/'@' and line break; b"" if none.

    The mate rule of the module docstring: ``name 1:N:0:ACGT`` gives ``name/1``.
    """
    fields = header.split(None, 1)
    if len(fields) != 2:
        return fields[0] if fields else b""
    first, description = fields
    if description[1:2] == b":" and not first.endswith(_MATES):
        return first + _mate_suffix(description)
    return first


def with_mate(ident: bytes, mate: int) -> bytes:
    """The id of a read of the file of mate `mate` (1 or 2) of a pair, 0 for a file of no pair:
    `ident` (from `read_id`) with ``/mate`` appended unless it ends in ``/1`` or ``/2`` already."""
    return ident if not mate or ident.endswith(_MATES) else ident + _MATE_SUFFIXES[mate]


@functools.lru_cache(maxsize=4096)  # a file's Casava descriptions mostly repeat: one per mate and index
def _mate_suffix(description: bytes) -> bytes:
    return b"/" + description[:1] if _CASAVA.match(description) else b""


def read_ids(buf: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    """`read_id` of many headers of one buffer at once, with numpy over the bytes.

    Header i's text (after its '>'/'@') is ``buf[starts[i]:ends[i]]`` and ``buf[ends[i]]``
    is its line break; `arr` is `buf` as uint8. Headers out of the common shape (empty,
    whitespace right after the marker, several whitespace characters before the
    description) go through `read_id` itself.
    """
    if not len(starts):
        return []
    mask = arr == ord(" ")
    for char in (b"\t", b"\v", b"\f"):
        if char in buf:
            mask |= arr == char[0]
    spaces = np.flatnonzero(mask)
    id_ends = np.minimum(np.append(spaces, len(buf))[np.searchsorted(spaces, starts)], ends)
    described = id_ends < ends
    odd = (starts >= ends) | _WHITE[arr[np.minimum(starts, ends)]]
    odd |= described & _WHITE[arr[np.minimum(id_ends + 1, ends)]]
    mates = _casava_mates(arr, starts, id_ends, ends, np.flatnonzero(described & ~odd))
    begins = starts.tolist()
    if mates is None:
        ids = [buf[a:b] for a, b in zip(begins, id_ends.tolist())]
    else:
        ids = [buf[a:b] + _MATE_SUFFIXES[m] for a, b, m in zip(begins, id_ends.tolist(), mates.tolist())]
    for index in np.flatnonzero(odd).tolist():
        ids[index] = read_id(buf[begins[index] : int(ends[index])])
    return ids


def _casava_mates(
    arr: np.ndarray, starts: np.ndarray, id_ends: np.ndarray, ends: np.ndarray, pick: np.ndarray
) -> np.ndarray | None:
    """Per header 0, or the mate (1, 2) its Casava description gives it; None if none does.
    `pick`: the headers whose description starts right after one whitespace character."""
    if not len(pick):
        return None
    desc, end = id_ends[pick] + 1, ends[pick]

    def at(k: int) -> np.ndarray:  # the description's k-th byte; the line break past its end
        return arr[np.minimum(desc + k, end)]

    mate, flag = at(0), at(2)
    ok = ((mate == ord("1")) | (mate == ord("2"))) & (at(1) == ord(":"))
    ok &= ((flag == ord("Y")) | (flag == ord("N"))) & (at(3) == ord(":")) & _DIGIT[at(4)]
    tail = np.maximum(id_ends[pick] - 2, 0)  # an id already ending in /1 or /2 keeps it
    ok &= ~((id_ends[pick] - starts[pick] >= 2) & (arr[tail] == ord("/")) & _MATE_DIGIT[arr[tail + 1]])
    pick, mate, position, end = pick[ok], mate[ok], desc[ok] + 5, end[ok]
    matched = np.zeros(len(pick), dtype=bool)
    active = np.arange(len(pick))
    while len(active):  # the rest of the digits of the third field, then ':'
        byte = arr[np.minimum(position[active], end[active])]
        matched[active[byte == ord(":")]] = True
        active = active[_DIGIT[byte]]
        position[active] += 1
    if not matched.any():
        return None
    mates = np.zeros(len(starts), dtype=np.int64)
    mates[pick[matched]] = mate[matched].astype(np.int64) - ord("0")
    return mates


def read_records(stream: BinaryIO, name: str, first_line: int = 1) -> Iterator[Record]:
    """The records of a plain or gzip FASTA or FASTQ byte stream, in file order, lazily.

    `first_line` is the line number of the stream's first byte: a reader started at a
    record's byte offset (from `core.scan`) passes the record's line so messages stay right.
    """
    return chain.from_iterable(_record_batches(stream, name, first_line))


def open_records(path: str) -> Iterator[Record]:
    """Records of a local FASTA or FASTQ file (plain or gzip)."""
    with open(path, "rb") as handle:
        yield from read_records(handle, path)


def _record_batches(stream: BinaryIO, name: str, first_line: int) -> Iterator[list[Record]]:
    """Records a block at a time (handing them out one by one costs more than the parse)."""
    batches = _line_batches(decompressed(stream, name), name, first_line)
    start = _first_record(batches, name)
    if start is not None:
        fastq, batches = start
        yield from (_fastq(batches, name) if fastq else _fasta(batches, name))


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


def decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    """The stream itself, or its gzip content (any number of members), refusing known
    binary formats by their magic bytes."""
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(stream)  # type: ignore[arg-type]
    head = stream.peek(16)[:16]  # type: ignore[attr-defined]
    if head[:2] == GZIP_MAGIC:
        return igzip.IGzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    refuse_binary(head, name)
    return stream


def refuse_binary(head: bytes, name: str) -> None:
    """Raise a `ReadsError` naming the format if `head`, a stream's first bytes (after
    decompression, if any), is a known binary format."""
    for magic, kind, fix in _MAGIC:
        if head.startswith(magic):
            raise ReadsError(name, 1, f"this is {kind}, not FASTA or FASTQ text", fix)


def damage(name: str, line: int, kind: str, **details: object) -> ReadsError:
    """The `ReadsError` for one kind of structural damage (shared with `core.scan`, so the
    reader and the scanner word every error alike)."""
    problem, fix = _DAMAGE[kind]
    return ReadsError(name, line, problem.format(**details), fix.format(**details))


_FASTQ_SHAPE = "FASTQ records are exactly 4 lines: '@' header, sequence, '+', quality (multi-line FASTQ is not supported)"
_DAMAGE = {
    "nul": (
        "binary data (a NUL byte) where FASTA or FASTQ text was expected",
        "Pass a FASTA or FASTQ file (plain text or gzip), not a binary or compressed archive.",
    ),
    "gzip": (
        "the gzip stream is damaged or truncated ({error})",
        "Re-download or re-compress the file; check it with `gzip -t`.",
    ),
    "not_reads": (
        "text before the first record: the first line that is not blank starts with neither "
        "'>' (FASTA) nor '@' (FASTQ)",
        "Pass a FASTA file (records start with '>') or a FASTQ file (records start with '@').",
    ),
    "no_id": (
        "a '{marker}' header with no id after it",
        "Give every record an id right after '{marker}' (e.g. '{marker}read_1').",
    ),
    "not_utf8": (
        "the header is not UTF-8 text",
        "Pass a FASTA or FASTQ text file; binary or mis-encoded files cannot be read.",
    ),
    "fastq_header": (
        "expected a FASTQ header starting with '@', found {found}",
        f"{_FASTQ_SHAPE}; check the file is complete and unwrapped.",
    ),
    "fastq_plus": (
        "expected the '+' line of the FASTQ record whose header is line {header}, found {found}",
        f"{_FASTQ_SHAPE}; unwrap multi-line FASTQ (e.g. `seqkit seq -w 0`).",
    ),
    "fastq_quality": (
        "the quality line has {quality} characters for a sequence of {bases} (FASTQ record whose header is line {header})",
        "Quality and sequence must be equally long; the file may be cut short or edited. Re-create it.",
    ),
    "fastq_truncated": (
        "the last FASTQ record is cut short: {lines} of its 4 lines",
        "The file is probably truncated; re-download or re-create it.",
    ),
    "fastq_blank": (
        "a blank line between FASTQ records",
        f"{_FASTQ_SHAPE}, with no blank lines between records; remove the blank lines.",
    ),
}


def describe(line: bytes) -> str:
    """A short quotation of a line for messages."""
    if not line.strip():
        return "a blank line"
    text = line[:20].decode("utf-8", "replace")
    return f"'{text}...'" if len(line) > 20 else f"'{text}'"


# Lines: batches of complete lines, line breaks (LF, CRLF, CR) removed.

def _line_batches(data: BinaryIO, name: str, first_line: int) -> Iterator[tuple[int, list[bytes]]]:
    """(line number of the first line, lines) per block; a NUL byte ends the stream with an
    error once the lines before it have been handed out."""
    number = first_line
    carry = b""
    first = True
    while True:
        try:
            block = data.read(BLOCK)
        except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:
            raise damage(name, number + carry.count(b"\n"), "gzip", error=exc) from None
        if first:
            first = False
            if block.startswith(BOM):
                block = block[len(BOM):]
            refuse_binary(block[:16], name)
        if not block:
            break
        text = carry + block
        if b"\r" in text:
            held = b"\r" if text.endswith(b"\r") else b""  # maybe half of a CRLF
            text = text[: len(text) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            held = b""
        cut = text.rfind(b"\n") + 1
        carry = text[cut:] + held
        nul = text.find(b"\x00", 0, cut)
        if nul >= 0:
            bad = number + text.count(b"\n", 0, nul)
            yield number, text[: text.rfind(b"\n", 0, nul) + 1].split(b"\n")[:-1]
            raise damage(name, bad, "nul")
        if cut:
            lines = text[:cut].split(b"\n")
            lines.pop()
            yield number, lines
            number += len(lines)
    if carry:
        text = carry.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\x00" in text:
            yield number, text[: text.rfind(b"\n", 0, text.find(b"\x00")) + 1].split(b"\n")[:-1]
            raise damage(name, number + text.count(b"\n", 0, text.find(b"\x00")), "nul")
        lines = text.split(b"\n")
        if not lines[-1]:
            lines.pop()
        yield number, lines


def _first_record(
    batches: Iterator[tuple[int, list[bytes]]], name: str
) -> tuple[bool, Iterator[tuple[int, list[bytes]]]] | None:
    """Skip leading blank lines; (is FASTQ, the batches from the first record on), or None
    for a stream with no record."""
    for number, lines in batches:
        for index, line in enumerate(lines):
            fastq = first_record_format(line, number + index, name)
            if fastq is None:
                continue

            def rest(
                number: int = number + index, lines: list[bytes] = lines[index:]
            ) -> Iterator[tuple[int, list[bytes]]]:
                yield number, lines
                yield from batches

            return fastq, rest()
    return None


def first_record_format(line: bytes, number: int, name: str) -> bool | None:
    """For a line before any record: None if blank, else whether it starts a FASTQ record
    (True) or a FASTA one (False); anything else is a `ReadsError`."""
    stripped = line.strip(WHITESPACE)
    if not stripped:
        return None
    if stripped[:1] == b">":
        return False
    if line[:1] == b"@":
        return True
    raise damage(name, number, "not_reads")


def _header_id(header: bytes, name: str, line: int, marker: str) -> str:
    ident = read_id(header)
    if not ident:
        raise damage(name, line, "no_id", marker=marker)
    try:
        return ident.decode("utf-8")
    except UnicodeDecodeError:
        raise damage(name, line, "not_utf8") from None


@dataclass
class _Pending:
    """The FASTA record being read: its id, header line and sequence lines so far."""

    ident: str
    line: int
    parts: list[bytes]


def _fasta(batches: Iterator[tuple[int, list[bytes]]], name: str) -> Iterator[list[Record]]:
    pending: _Pending | None = None
    for number, lines in batches:
        done: list[Record] = []
        try:
            first = next((index for index, line in enumerate(lines) if line[:1] == b">"), len(lines))
            pending = _fasta_lines(lines[:first], number, pending, done, name)
            regular = _regular_fasta(lines[first:], number + first)
            if regular is None:
                pending = _fasta_lines(lines[first:], number + first, pending, done, name)
            else:
                if pending is not None:
                    done.append(_fasta_record(pending))
                records, pending = regular
                done += records
        except ReadsError:
            yield done  # the records before the damage, then the error
            raise
        yield done
    if pending is not None:
        yield [_fasta_record(pending)]


def _fasta_lines(
    lines: list[bytes], number: int, pending: _Pending | None, done: list[Record], name: str
) -> _Pending | None:
    """Read FASTA lines one by one: append finished records to `done`; the open record."""
    for index, line in enumerate(lines):
        first = line[:1]
        if first != b">" and (first not in WHITESPACE or line.lstrip(WHITESPACE)[:1] != b">"):
            if pending is not None:
                pending.parts.append(line)
            continue
        if pending is not None:
            done.append(_fasta_record(pending))
        header_line = number + index
        pending = _Pending(_header_id(line.lstrip(WHITESPACE)[1:], name, header_line, ">"), header_line, [])
    return pending


def _fasta_record(record: _Pending) -> Record:
    ident, line = record.ident, record.line
    sequence = b"".join(record.parts)
    if sequence.isalpha():  # bytes.isalpha: ASCII letters only
        return Record(ident, sequence.decode("ascii"), line)
    sequence = sequence.translate(None, WHITESPACE)
    if not sequence:
        return Record(ident, "", line, "empty")
    text = sequence.decode("latin-1")
    return Record(ident, text, line, None if sequence.isalpha() else "invalid_characters")


def _fastq(batches: Iterator[tuple[int, list[bytes]]], name: str) -> Iterator[list[Record]]:
    held: list[bytes] = []  # lines of a record cut by the end of a batch
    held_number = 0
    blank_line = 0  # a blank line where a header belongs: fine only if nothing but blanks follows
    for number, lines in batches:
        if held:
            lines, number = held + lines, held_number
        if blank_line:
            only_blanks(lines, blank_line, name)
            continue
        whole = len(lines) - len(lines) % 4
        held, held_number = lines[whole:], number + whole
        regular = _regular_fastq(lines, whole, number)
        if regular is None:
            done: list[Record] = []
            try:
                blank_line = _fastq_one_by_one(lines[:whole], number, name, done)
            except ReadsError:
                yield done  # the records before the damage, then the error
                raise
            if blank_line:
                only_blanks(lines[blank_line - number :], blank_line, name)
                held = []
            regular = done
        yield regular
    if held and not blank_line:
        if not held[0].strip(WHITESPACE):
            only_blanks(held, held_number, name)
        else:
            raise fastq_tail_damage(held, held_number, name)


def _fastq_one_by_one(lines: list[bytes], number: int, name: str, done: list[Record]) -> int:
    """Append the records of whole 4-line groups to `done`, raising at the first damage;
    the line number of a blank line where a header belongs (0 if none) ends the records."""
    line = number - 4
    four = iter(lines)
    for header, sequence, plus, quality in zip(four, four, four, four):
        line += 4
        if header[:1] != b"@" or plus[:1] != b"+" or len(quality) != len(sequence):
            if not header.strip(WHITESPACE):
                return line
            raise fastq_record_damage(header, sequence, plus, quality, line, name)
        ident = _header_id(header[1:], name, line, "@")
        if sequence.isalpha():
            done.append(Record(ident, sequence.decode("ascii"), line, None))
        elif not sequence:
            done.append(Record(ident, "", line, "empty"))
        else:
            done.append(Record(ident, sequence.decode("latin-1"), line, "invalid_characters"))
    return 0


def _regular_fastq(lines: list[bytes], whole: int, number: int) -> list[Record] | None:
    """The records of the first `whole` lines in bulk when every one is well formed with a
    plain id and letters only (nearly always); None sends the batch through the loop that
    finds what is wrong."""
    if not whole:
        return []
    sequences = lines[1:whole:4]
    if (
        list(map(len, sequences)) != list(map(len, lines[3:whole:4]))
        or b"".join(map(_FIRST_BYTE, lines[2:whole:4])) != b"+" * len(sequences)
        or not all(map(bytes.isalpha, sequences))
    ):
        return None
    ids = _plain_ids(lines[0:whole:4], b"@")
    if ids is None:
        return None
    return list(map(Record, ids, map(bytes.decode, sequences), range(number, number + whole, 4), repeat(None)))


def _regular_fasta(lines: list[bytes], number: int) -> tuple[list[Record], _Pending] | None:
    """The records of alternating header and sequence lines (one-line FASTA, the usual
    layout) in bulk, and the last record, which the next block may continue; None when the
    lines are laid out otherwise."""
    sequences = lines[1::2]
    if not sequences or not all(map(bytes.isalpha, sequences)):
        return None
    ids = _plain_ids(lines[0::2], b">")
    if ids is None:
        return None
    complete = len(ids) - 1  # the last record is left open
    records = list(map(Record, ids[:complete], map(bytes.decode, sequences), range(number, number + 2 * complete, 2), repeat(None)))
    return records, _Pending(ids[-1], number + 2 * complete, sequences[complete:])


def _plain_ids(headers: list[bytes], marker: bytes) -> list[str] | None:
    """The ids of headers that all start with `marker` and hold a non-empty ASCII id; None
    otherwise (the line-by-line path then finds what is wrong)."""
    if b"".join(map(_FIRST_BYTE, headers)) != marker * len(headers):
        return None
    text = b"\n".join(headers) + b"\n"
    if not text.isascii():
        return None
    ends = np.cumsum(np.fromiter(map(len, headers), np.int64, len(headers)) + 1) - 1
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 1, ends[:-1] + 2  # past each marker
    ids = read_ids(text, np.frombuffer(text, np.uint8), starts, ends)
    return list(map(bytes.decode, ids)) if all(ids) else None


def fastq_record_damage(
    header: bytes, sequence: bytes, plus: bytes, quality: bytes, line: int, name: str
) -> ReadsError:
    """The error for a 4-line FASTQ record (header at `line`) that is not well formed."""
    if header[:1] != b"@":
        return damage(name, line, "fastq_header", found=describe(header))
    _header_id(header[1:], name, line, "@")  # a header's own damage comes first
    if plus[:1] != b"+":
        return damage(name, line + 2, "fastq_plus", header=line, found=describe(plus))
    return damage(name, line + 3, "fastq_quality", quality=len(quality), bases=len(sequence), header=line)


def fastq_tail_damage(lines: list[bytes], line: int, name: str) -> ReadsError:
    """The error for the 1 to 3 lines of a FASTQ record cut by the end of the stream."""
    if lines[0][:1] != b"@":
        return damage(name, line, "fastq_header", found=describe(lines[0]))
    _header_id(lines[0][1:], name, line, "@")
    if len(lines) == 3 and lines[2][:1] != b"+":
        return damage(name, line + 2, "fastq_plus", header=line, found=describe(lines[2]))
    return damage(name, line, "fastq_truncated", lines=len(lines))


def only_blanks(lines: list[bytes], blank_line: int, name: str) -> None:
    """After a blank line (at `blank_line`) where a FASTQ header belongs, only blank lines
    may follow."""
    for line in lines:
        if line.strip(WHITESPACE):
            raise damage(name, blank_line, "fastq_blank")
