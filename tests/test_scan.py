"""The record scanner agrees with the reader: same records, ids, lines, offsets and errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.reads import ReadsError, read_id, read_ids, read_records
from core.scan import RecordScanner, Scanned
from damaged_reads import FASTA_DAMAGE, FASTQ_DAMAGE

_BREAKS = st.sampled_from([b"\n", b"\r\n", b"\r"])
_IDS = st.text("ACGTxyz_:.-/12", min_size=1, max_size=8).map(str.encode)
_DESCRIPTIONS = st.one_of(
    st.just(b""),
    st.sampled_from([b" 1:N:0:ACGT", b" 2:Y:18:GG+TT", b" 1:N:0", b" 3:N:0:A", b"  2:N:0:A", b"\t1:N:7:", b" x y", b" 1:N:12345:"]),
    st.binary(max_size=6).map(lambda b: b" " + b.replace(b"\n", b"").replace(b"\r", b"").replace(b"\x00", b"")),
)
_BASES = st.text("ACGTNacgtn", max_size=30).map(str.encode)


@st.composite
def fasta(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        indent = draw(st.sampled_from([b"", b"", b" "]))
        parts.append([indent + b">" + draw(_IDS) + draw(_DESCRIPTIONS)])
        for _ in range(draw(st.integers(0, 3))):
            parts[-1].append(draw(st.sampled_from([b"", b"  "])) if draw(st.booleans()) and draw(st.booleans()) else draw(_BASES))
    return _join(draw, [line for record in parts for line in record])


@st.composite
def fastq(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        bases = draw(_BASES)
        quality = draw(st.text("@!I#+>", min_size=len(bases), max_size=len(bases)).map(str.encode))
        lines += [b"@" + draw(_IDS) + draw(_DESCRIPTIONS), bases, draw(st.sampled_from([b"+", b"+r"])), quality]
    return _join(draw, lines)


def _join(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    head = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf"])) + b"".join(
        draw(_BREAKS) for _ in range(draw(st.integers(0, 2)))
    )
    body = b"".join(line + draw(_BREAKS) for line in lines)
    if body and draw(st.booleans()):
        body = body.rstrip(b"\r\n")  # no line break at the end
    return head + body + (draw(_BREAKS) if draw(st.booleans()) and draw(st.booleans()) else b"")


def scan(data: bytes, sizes: list[int]) -> Scanned:
    scanner = RecordScanner("in")
    found: list[Scanned] = []
    position = 0
    for size in sizes:
        found.append(scanner.feed(data[position : position + size]))
        position += size
    found.append(scanner.feed(data[position:]))
    found.append(scanner.close())
    return Scanned(
        np.concatenate([f.offsets for f in found]),
        np.concatenate([f.lines for f in found]),
        [i for f in found for i in f.ids],
    )


def outcome(run) -> tuple[list, str | None]:  # noqa: ANN001
    got: list = []
    try:
        run(got)
    except ReadsError as error:
        return got, str(error)
    return got, None


def check_agreement(data: bytes, sizes: list[int]) -> None:
    records, read_error = outcome(lambda got: got.extend(read_records(io.BytesIO(data), "in")))
    scanned, scan_error = outcome(lambda got: got.append(scan(data, sizes)))
    assert scan_error == read_error
    if read_error is not None:
        return
    (found,) = scanned
    assert [i.decode() for i in found.ids] == [r.id for r in records]
    assert found.lines.tolist() == [r.line for r in records]
    for index in range(len(records)):
        stream = io.BytesIO(data[int(found.offsets[index]) :])
        assert list(read_records(stream, "in", first_line=int(found.lines[index]))) == records[index:]


_SIZES = st.lists(st.integers(1, 40), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(fasta(), fastq()), sizes=_SIZES)
def test_scanner_agrees_with_reader(data: bytes, sizes: list[int]) -> None:
    check_agreement(data, sizes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(fasta(), fastq()), sizes=_SIZES, cuts=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
    [b"", b"\x00", b"\n", b"\r", b"@", b"+", b">", b"\xff", b"A", b" "])), min_size=1, max_size=3))
def test_scanner_agrees_with_reader_on_damaged_input(data: bytes, sizes: list[int], cuts: list[tuple[int, bytes]]) -> None:
    for at, insert in cuts:  # delete one byte here, insert there: every kind of damage
        at %= len(data) + 1
        data = data[:at] + insert + data[at + (not insert) :]
    check_agreement(data, sizes)


def test_one_byte_blocks() -> None:
    data = b"\xef\xbb\xbf\r\n@a 1:N:0:A\r\nAC\r\n+\r\n@@\r\n@b/2 1:N:0:A\rGT\r+\r##\r"
    check_agreement(data, [1] * len(data))
    found = scan(data, [1] * len(data))
    assert found.ids == [b"a/1", b"b/2"] and found.lines.tolist() == [2, 6]


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        *FASTA_DAMAGE,
        *FASTQ_DAMAGE,
        (b"BZh91AY&SY" + bytes(10), 1, "bunzip2"),
    ],
)
def test_scanner_raises_the_readers_errors(data: bytes, line: int, words: str) -> None:
    with pytest.raises(ReadsError) as error:
        scan(data, [3] * 10)
    assert str(error.value).startswith(f"in, line {line}:") and words in str(error.value)
    check_agreement(data, [3] * 10)


_HEADER_WORDS = st.sampled_from([b"r", b"r/1", b"r/2", b"/1", b"1:N:0:A", b"2:Y:123:", b"1:N:0", b"1:N::", b"3:N:0:A", b"2:n:0:A", b"x"])


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(st.lists(st.one_of(_HEADER_WORDS, _IDS), max_size=3).flatmap(
    lambda words: st.lists(st.sampled_from([b" ", b"\t", b"  ", b"\v"]), min_size=len(words) + 1, max_size=len(words) + 1).map(
        lambda gaps: gaps[0][: len(gaps[0]) % 2] + b"".join(w + g for w, g in zip(words, gaps[1:])))), min_size=1, max_size=12))
def test_read_ids_is_read_id_over_many_headers(headers: list[bytes]) -> None:
    text = b"".join(b">" + header + b"\n" for header in headers)
    lengths = np.array([len(h) for h in headers], dtype=np.int64)
    ends = np.cumsum(lengths + 2) - 1
    starts = ends - lengths
    assert read_ids(text, np.frombuffer(text, np.uint8), starts, ends) == [read_id(h) for h in headers]
