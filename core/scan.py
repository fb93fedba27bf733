"""Record scanner for the plan pass: where each record starts, its line and its id, fast.

The planner must cut an input of 10^8 reads into shards before (and while) workers score
them, so it cannot afford a full parse. `RecordScanner` takes the (already decompressed)
stream block by block and finds line breaks, headers and ids with numpy over the bytes;
Python runs per block, and per record only to slice the id out.

It agrees exactly with `core.reads.read_records` on the same stream: the same records in
the same order, the same output ids (`core.reads.read_id`'s mate rule), the same header
line numbers, and reading from ``offsets[i]`` with ``first_line=lines[i]`` yields record i
onward. Structural damage it can see (binary data, text that is neither FASTA nor FASTQ, a
header with no id or a non-UTF-8 one, a FASTQ record that is not 4 well-formed lines, a
truncated last FASTQ record) raises the very `ReadsError` the reader raises; damage confined
to a record's sequence (the ``empty`` and ``invalid_characters`` statuses) is left to the
reader, which sees the sequence.

    scanner = RecordScanner("reads.fq")
    for block in blocks:
        found = scanner.feed(block)   # records complete so far
    found = scanner.close()           # the rest; checks the end

A FASTA record is reported once its header line is complete, a FASTQ record once its 4
lines are. Memory holds the unfinished line (FASTA) or record (FASTQ) and one block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.reads import (
    BOM,
    WHITESPACE,
    damage,
    fastq_record_damage,
    fastq_tail_damage,
    first_record_format,
    only_blanks,
    read_ids,
    refuse_binary,
)

_LF, _CR, _GT, _AT, _PLUS = 10, 13, ord(">"), ord("@"), ord("+")
_WHITE_CODES = np.zeros(256, dtype=bool)
_WHITE_CODES[list(WHITESPACE)] = True


@dataclass
class Scanned:
    """Records found by one `feed` or `close` call, in stream order."""

    offsets: np.ndarray  # int64: byte offset of each record's first byte in the decompressed stream
    lines: np.ndarray  # int64: 1-based line number of each record's header line
    ids: list[bytes]  # output ids (after the mate rule), UTF-8

    def __len__(self) -> int:
        return len(self.ids)


def _nothing() -> Scanned:
    return Scanned(np.zeros(0, np.int64), np.zeros(0, np.int64), [])


@dataclass
class _Lines:
    """The complete lines of a buffer: content spans [starts, ends), line breaks excluded."""

    starts: np.ndarray
    ends: np.ndarray
    next_start: int  # where the first incomplete line begins

    def __len__(self) -> int:
        return len(self.ends)


class RecordScanner:
    """Finds where records start, and their ids, in a FASTA or FASTQ byte stream fed block
    by block (already decompressed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._parts: list[bytes] = []  # unprocessed bytes: the unfinished line or FASTQ record
        self._base = 0  # stream offset of the first unprocessed byte
        self._line = 1  # line number of the first unprocessed line
        self._started = False  # BOM skipped and magic bytes checked
        self._fastq: bool | None = None  # None until the first record
        self._blank_line = 0  # FASTQ: a blank line where a header belongs (only blanks may follow)
        self._closed = False

    def feed(self, block: bytes) -> Scanned:
        """Records complete within what was fed so far (and not returned before)."""
        if self._closed:
            raise ValueError("feed() after close()")
        if not block:
            return _nothing()
        self._parts.append(block)
        if not self._started:
            if sum(map(len, self._parts)) < 16:
                return _nothing()
            self._start()
        elif b"\n" not in block and b"\r" not in block:
            return _nothing()  # no line ends here: nothing new to find
        return self._scan(final=False)

    def close(self) -> Scanned:
        """The records left at the end of the stream; a truncated last FASTQ record, or
        anything but blank lines after a blank line between FASTQ records, is an error."""
        if self._closed:
            return _nothing()
        if not self._started:
            self._start()
        found = self._scan(final=True)
        self._closed = True
        return found

    def _start(self) -> None:
        head = b"".join(self._parts)
        if head.startswith(BOM):
            head = head[len(BOM) :]
            self._base = len(BOM)
        refuse_binary(head[:16], self.name)
        self._parts = [head]
        self._started = True

    def _scan(self, final: bool) -> Scanned:
        buf = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        if final and buf and not buf.endswith((b"\n", b"\r")):
            buf += b"\n"  # the last line needs no line break; give it one past the end
        arr = np.frombuffer(buf, np.uint8)
        lines = _split_lines(buf, arr, final)
        nul = buf.find(b"\x00", 0, lines.next_start)
        if nul >= 0:  # the lines before the NUL's line are scanned first, as the reader does
            count = int(np.searchsorted(lines.ends, nul))
            nul_line = self._line + count
            lines = _Lines(lines.starts[:count], lines.ends[:count], int(lines.starts[count]))
            self._scan_lines(buf, arr, lines, final=False)
            raise damage(self.name, nul_line, "nul")
        return self._scan_lines(buf, arr, lines, final)

    def _scan_lines(self, buf: bytes, arr: np.ndarray, lines: _Lines, final: bool) -> Scanned:
        """Scan complete lines; keep the unused tail of `buf` for the next call."""
        first = 0
        if self._fastq is None:
            for first in range(len(lines)):
                line = buf[lines.starts[first] : lines.ends[first]]
                self._fastq = first_record_format(line, self._line + first, self.name)
                if self._fastq is not None:
                    break
            else:
                first = len(lines)
        if self._fastq:
            found, used = self._fastq_records(buf, arr, lines, first, final)
        else:
            found, used = self._fasta_records(buf, arr, lines, first), len(lines)
        keep = int(lines.starts[used]) if used < len(lines) else lines.next_start
        self._parts = [buf[keep:]] if keep < len(buf) else []
        self._base += keep
        self._line += used
        return found

    def _fasta_records(self, buf: bytes, arr: np.ndarray, lines: _Lines, first: int) -> Scanned:
        starts, ends = lines.starts[first:], lines.ends[first:]
        if not len(starts):
            return _nothing()
        firsts = arr[starts]
        header = firsts == _GT
        indented = np.flatnonzero(_WHITE_CODES[firsts])
        for index in indented.tolist():  # rare: a header may follow whitespace
            header[index] = buf[starts[index] : ends[index]].lstrip(WHITESPACE)[:1] == b">"
        rows = np.flatnonzero(header)
        line_starts = starts[rows]
        marks = line_starts.copy()
        for index in np.flatnonzero(firsts[rows] != _GT).tolist():
            marks[index] = buf.index(b">", int(line_starts[index]))
        ids = self._ids(buf, arr, marks + 1, ends[rows], rows + first, ">")
        return Scanned(line_starts + self._base, rows + first + self._line, ids)

    def _fastq_records(
        self, buf: bytes, arr: np.ndarray, lines: _Lines, first: int, final: bool
    ) -> tuple[Scanned, int]:
        """FASTQ records from line `first` on: (records, lines used)."""
        if self._blank_line:
            only_blanks(_line_list(buf, lines, first, len(lines)), self._blank_line, self.name)
            return _nothing(), len(lines)
        count = (len(lines) - first) // 4
        heads = first + 4 * np.arange(count, dtype=np.int64)
        starts, ends = lines.starts, lines.ends
        h_start, s_start, s_end = starts[heads], starts[heads + 1], ends[heads + 1]
        p_start, q_start, q_end = starts[heads + 2], starts[heads + 3], ends[heads + 3]
        good = (arr[h_start] == _AT) & (arr[p_start] == _PLUS) & (q_end - q_start == s_end - s_start)
        bad = np.flatnonzero(~good)
        whole = int(bad[0]) if len(bad) else count
        heads = heads[:whole]
        ids = self._ids(buf, arr, h_start[:whole] + 1, ends[heads], heads, "@")
        found = Scanned(h_start[:whole] + self._base, heads + self._line, ids)
        used = first + 4 * whole
        if whole < count:  # a damaged record, or the blank lines at the end
            rows = _line_list(buf, lines, used, used + 4)
            if rows[0].strip(WHITESPACE):
                raise fastq_record_damage(*rows, self._line + used, self.name)
            self._blank_line = self._line + used
            only_blanks(_line_list(buf, lines, used, len(lines)), self._blank_line, self.name)
            return found, len(lines)
        if final and used < len(lines):
            rows = _line_list(buf, lines, used, len(lines))
            if rows[0].strip(WHITESPACE):
                raise fastq_tail_damage(rows, self._line + used, self.name)
            only_blanks(rows, self._line + used, self.name)
            return found, len(lines)
        return found, used

    def _ids(
        self, buf: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, rows: np.ndarray, marker: str
    ) -> list[bytes]:
        """Output ids of the headers whose text (after the marker) spans [starts, ends);
        `rows` are their line indices in the buffer, for messages."""
        ids = read_ids(buf, arr, starts, ends)
        if not buf.isascii() or not all(ids):
            self._check_ids(ids, rows, marker)
        return ids

    def _check_ids(self, ids: list[bytes], rows: np.ndarray, marker: str) -> None:
        """Raise the reader's error for the first id that is empty or not UTF-8."""
        for index, ident in enumerate(ids):
            line = self._line + int(rows[index])
            if not ident:
                raise damage(self.name, line, "no_id", marker=marker)
            try:
                ident.decode("utf-8")
            except UnicodeDecodeError:
                raise damage(self.name, line, "not_utf8") from None


def _split_lines(buf: bytes, arr: np.ndarray, final: bool) -> _Lines:
    """Line spans of `buf`, which starts at a line start; a CR at the very end is held back
    unless `final` (it may be the first half of a CRLF). At the end of the stream `buf`
    ends in a line break (`_scan` adds one), so every byte is in a complete line."""
    if b"\r" not in buf:
        ends = np.flatnonzero(arr == _LF)
        starts = np.concatenate(([0], ends + 1))
    else:
        limit = len(buf) if final or not buf.endswith(b"\r") else len(buf) - 1
        cr = np.flatnonzero(arr[:limit] == _CR)
        lf = np.flatnonzero(arr[:limit] == _LF)
        lone_lf = lf[(lf == 0) | (arr[lf - 1] != _CR)]
        ends = np.union1d(cr, lone_lf)
        crlf = (arr[ends] == _CR) & (np.append(arr, 0)[ends + 1] == _LF)
        starts = np.concatenate(([0], ends + 1 + crlf))
    return _Lines(starts[:-1].astype(np.int64, copy=False), ends.astype(np.int64, copy=False), int(starts[-1]))


def _line_list(buf: bytes, lines: _Lines, begin: int, end: int) -> list[bytes]:
    return [buf[int(a) : int(b)] for a, b in zip(lines.starts[begin:end], lines.ends[begin:end])]
