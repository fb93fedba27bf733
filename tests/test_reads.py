"""The FASTA and FASTQ reader on good and malformed input: documented errors and per-read statuses."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import struct
import tracemalloc
import zlib

import pytest

from core.reads import ReadsError, Record, mark_duplicates, open_records, read_id, read_records
from damaged_reads import FASTA_DAMAGE, FASTQ_DAMAGE
from job.cli import main


def records(data: bytes, name: str = "in.fa") -> list[Record]:
    return list(read_records(io.BytesIO(data), name))


def test_accepts_crlf_lowercase_blank_lines_descriptions_and_any_width() -> None:
    data = b">r1 some description\r\nacgt\r\nAC\r\n\r\n>r2\tdesc\nACGTACGTAC GT\n\n"
    assert records(data) == [Record("r1", "acgtAC", 1), Record("r2", "ACGTACGTACGT", 5)]


def test_gzip_is_detected_by_content() -> None:
    data = b">r1\nACGT\n>r2\nGG\n"
    assert records(gzip.compress(data), "in.fa") == records(data)


def test_empty_file_has_no_records() -> None:
    assert records(b"") == []
    assert records(b"\n\n") == []


def test_header_only_and_one_base_reads_are_statuses_not_errors() -> None:
    got = records(b">empty\n>one\nA\n>last\n")
    assert [(r.id, r.sequence, r.status) for r in got] == [("empty", "", "empty"), ("one", "A", None), ("last", "", "empty")]


def test_invalid_characters_are_a_per_read_status() -> None:
    got = records(b">ok\nACGT\n>bad\nAC1GT\n>gap\nAC-GT\n")
    assert [r.status for r in got] == [None, "invalid_characters", "invalid_characters"]


def test_duplicate_ids_keep_the_first_and_mark_the_rest() -> None:
    seen: set[str] = set()
    first = list(mark_duplicates(records(b">a\nAC\n>b\nGG\n>a\nTT\n"), seen))
    second = list(mark_duplicates(records(b">b\nAC\n"), seen))  # across files of one run
    assert [(r.id, r.sequence, r.status) for r in first] == [("a", "AC", None), ("b", "GG", None), ("a", "TT", "duplicate_id")]
    assert second[0].status == "duplicate_id"


@pytest.mark.parametrize(("data", "line", "words"), FASTA_DAMAGE)
def test_structural_damage_names_file_line_and_fix(data: bytes, line: int, words: str) -> None:
    with pytest.raises(ReadsError) as error:
        records(data, "sample.fa")
    message = str(error.value)
    assert message.startswith(f"sample.fa, line {line}:") and words in message
    assert "{" not in message  # every placeholder of the problem and its fix filled in
    assert error.value.line == line


def test_truncated_gzip_is_an_error_not_a_traceback() -> None:
    data = gzip.compress(b">r1\n" + b"ACGT" * 5000 + b"\n")[:-20]
    with pytest.raises(ReadsError, match="gzip stream is damaged"):
        records(data, "cut.fa.gz")


def test_cli_reports_bad_fasta_with_exit_65(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.fa"
    bad.write_bytes(b"ACGT\n")
    assert main(["translate", "--input", str(bad), "--chunk-length", "500", "--out-dir", str(tmp_path / "o")]) == 65
    err = capsys.readouterr().err
    assert f"{bad}, line 1:" in err and "Traceback" not in err
    assert main(["translate", "--input", str(tmp_path / "missing.fa"), "--chunk-length", "500", "--out-dir", str(tmp_path / "o")]) == 65


class _Generated(io.RawIOBase):
    """An endless-looking FASTA stream produced on the fly (never held in memory)."""

    def __init__(self, n_records: int) -> None:
        self._left, self._buffer = n_records, b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while len(self._buffer) < len(target) and self._left:
            self._left -= 1
            self._buffer += b">read_%d\n" % self._left + b"ACGTTGCA" * 60 + b"\n"
        n = min(len(target), len(self._buffer))
        target[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


def test_memory_does_not_grow_with_file_size() -> None:
    peaks = []
    for n in (10_000, 40_000):  # well past one 1 MiB read block
        tracemalloc.start()
        count = sum(1 for _ in read_records(io.BufferedReader(_Generated(n)), "gen.fa"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == n
    assert peaks[1] < 1.5 * peaks[0] + 64 * 1024  # 4x the input, about the same peak


def test_every_command_has_help(capsys) -> None:  # noqa: ANN001
    for command in ("translate", "run", "status", "make-demo-models", "convert-classifier", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: virnucpro {command}" in capsys.readouterr().out


# FASTQ, compression kinds, line breaks, binary input, mates

READS = [("r1", "ACGTAC", None), ("r2", "", "empty"), ("r3", "AC-GT", "invalid_characters"), ("r4", "nnAC", None)]


def as_fasta(reads: list[tuple[str, str, str | None]]) -> bytes:
    return b"".join(b">%s desc\n%s\n" % (ident.encode(), seq.encode()) for ident, seq, _ in reads)


def as_fastq(reads: list[tuple[str, str, str | None]]) -> bytes:
    return b"".join(
        b"@%s desc\n%s\n+\n%s\n" % (ident.encode(), seq.encode(), b"@" * len(seq)) for ident, seq, _ in reads
    )


def bgzf(data: bytes, block: int = 7) -> bytes:
    """BGZF (the blocked gzip of samtools/tabix): one gzip member per block, each with the
    'BC' extra field holding the member's size, then the empty end-of-file member."""
    members = []
    for start in range(0, len(data), block) if data else []:
        chunk = data[start : start + block]
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(chunk) + deflate.flush()
        size = 18 + len(body) + 8
        header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H2sHH", 6, b"BC", 2, size - 1)
        members.append(header + body + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    eof = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
    return b"".join(members) + eof


def summary(data: bytes, name: str = "in") -> list[tuple[str, str, str | None]]:
    return [(r.id, r.sequence, r.status) for r in records(data, name)]


@pytest.mark.parametrize(
    "pack",
    [
        lambda d: d,
        lambda d: gzip.compress(d),
        lambda d: gzip.compress(d[:20]) + gzip.compress(d[20:41]) + gzip.compress(d[41:]),  # multi-member
        bgzf,
    ],
    ids=["plain", "gzip", "multi-member gzip", "bgzf"],
)
@pytest.mark.parametrize("layout", [as_fasta, as_fastq], ids=["fasta", "fastq"])
def test_fastq_and_every_gzip_kind_give_the_reads_of_the_fasta(pack, layout) -> None:  # noqa: ANN001
    assert summary(pack(layout(READS))) == READS
    fastq = records(pack(as_fastq(READS)))
    assert [r.line for r in fastq] == [1, 5, 9, 13]


def test_bgzf_helper_writes_real_bgzf() -> None:
    data = bgzf(b">r1\nACGT\n")
    assert data[12:16] == b"BC\x02\x00" and gzip.decompress(data) == b">r1\nACGT\n"


@pytest.mark.parametrize("breaks", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_line_break_gives_every_record(breaks: bytes) -> None:
    for layout in (as_fasta, as_fastq):
        data = layout(READS).replace(b"\n", breaks)
        got = records(data)
        assert [(r.id, r.sequence, r.status) for r in got] == READS
        assert [r.line for r in got] == [r.line for r in records(layout(READS))]


def test_cr_only_fasta_is_not_one_read() -> None:  # issue 12 item 1
    data = b">ok1\rACGT\r>ok2\rGGCC\r>ok3\rTT\r"
    assert summary(data) == [("ok1", "ACGT", None), ("ok2", "GGCC", None), ("ok3", "TT", None)]


def test_a_utf8_byte_order_mark_is_accepted() -> None:  # issue 12 item 9
    assert summary(b"\xef\xbb\xbf>r1\nACGT\n") == [("r1", "ACGT", None)]
    assert summary(b"\xef\xbb\xbf@r1\nACGT\n+\nIIII\n") == [("r1", "ACGT", None)]
    assert summary(gzip.compress(b"\xef\xbb\xbf\n>r1\nAC\n")) == [("r1", "AC", None)]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(20), "this is a PNG image, not FASTA or FASTQ text"),
        (bz2.compress(b">r1\nACGT\n"), "bzip2-compressed data, not FASTA or FASTQ text. Decompress it with bunzip2, or recompress with gzip"),
        (lzma.compress(b">r1\nACGT\n"), "xz-compressed data"),
        (b"\x28\xb5\x2f\xfd" + bytes(12), "zstd-compressed data"),
        (b"PK\x03\x04" + bytes(30), "a zip archive"),
        (b"%PDF-1.7\n" + bytes(10), "a PDF document"),
        (gzip.compress(b"BAM\x01" + bytes(40)), "a BAM file (binary alignments), not FASTA or FASTQ text. Convert it to FASTQ first: `samtools fastq"),
        (b">r1\nAC\x00GT\n", "binary data (a NUL byte)"),
    ],
    ids=["png", "bzip2", "xz", "zstd", "zip", "pdf", "bam", "nul"],
)
def test_binary_input_is_named_with_its_fix(data: bytes, words: str) -> None:  # issue 12 item 11
    with pytest.raises(ReadsError) as error:
        records(data, "sample.fq")
    assert str(error.value).startswith("sample.fq, line ") and words in str(error.value)


@pytest.mark.parametrize(("data", "line", "words"), FASTQ_DAMAGE)
def test_malformed_fastq_names_file_line_and_fix(data: bytes, line: int, words: str) -> None:
    with pytest.raises(ReadsError) as error:
        records(data, "sample.fq")
    message = str(error.value)
    assert message.startswith(f"sample.fq, line {line}:") and words in message
    assert "{" not in message  # every placeholder of the problem and its fix filled in
    assert error.value.line == line and len(message.split(": ", 1)[1].split(". ")) >= 2  # a fix follows the problem


def test_fastq_damage_confined_to_a_read_is_its_status() -> None:
    data = b"@e\n\n+\n\n@bad\nAC*GT\n+\nIIIII\n@ok\nacgt\n+\n@@@@\n\n\n"  # '@' quality, trailing blanks
    assert summary(data) == [("e", "", "empty"), ("bad", "AC*GT", "invalid_characters"), ("ok", "acgt", None)]


def test_a_reader_started_at_a_record_names_the_right_lines() -> None:
    data = b"@r1\nACGT\n+\nIIII\n@r2\nAC\n+\nII\n@r3\nAC\n+\nI\n"
    offset = data.index(b"@r2")
    got = read_records(io.BytesIO(data[offset:]), "in.fq", first_line=5)
    assert next(got) == Record("r2", "AC", 5)
    with pytest.raises(ReadsError, match=r"^in.fq, line 12: the quality line"):
        next(got)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"name 1:N:0:ACGT", b"name/1"),
        (b"name 2:Y:18:ACGT+GGTT", b"name/2"),
        (b"name/1 2:N:0:ACGT", b"name/1"),  # an id's own /1 /2 is kept
        (b"name/2", b"name/2"),
        (b"name 3:N:0:ACGT", b"name"),
        (b"name 1:N:0", b"name"),  # needs the ':' after the control number
        (b"name 1:X:0:A", b"name"),
        (b"name\t1:N:0:A", b"name/1"),
        (b"  name  1:N:0:A", b"name/1"),
        (b"SRR1.1 HWI:8:1101:1:1 length=150", b"SRR1.1"),
        (b"", b""),
        (b"   ", b""),
    ],
)
def test_read_id_mate_rule(header: bytes, expected: bytes) -> None:
    assert read_id(header) == expected


def test_paired_files_give_distinct_mates_and_true_duplicates_stay_duplicates(tmp_path) -> None:  # noqa: ANN001
    one = b"@M1:8:FC:1:1101:1:1 1:N:0:ACGT\nACGT\n+\nIIII\n@M1:8:FC:1:1101:1:2 1:N:0:ACGT\nGGCC\n+\nIIII\n"
    two = one.replace(b" 1:N:0", b" 2:N:0") + b"@M1:8:FC:1:1101:1:1 2:N:0:ACGT\nTTTT\n+\nIIII\n"
    (tmp_path / "R1.fastq.gz").write_bytes(gzip.compress(one))
    (tmp_path / "R2.fastq.gz").write_bytes(gzip.compress(two))
    seen: set[str] = set()
    got = [r for path in ("R1.fastq.gz", "R2.fastq.gz") for r in mark_duplicates(open_records(str(tmp_path / path)), seen)]
    assert [(r.id, r.status) for r in got] == [
        ("M1:8:FC:1:1101:1:1/1", None),
        ("M1:8:FC:1:1101:1:2/1", None),
        ("M1:8:FC:1:1101:1:1/2", None),
        ("M1:8:FC:1:1101:1:2/2", None),
        ("M1:8:FC:1:1101:1:1/2", "duplicate_id"),
    ]


def test_cli_translate_reads_fastq_like_fasta(tmp_path) -> None:  # noqa: ANN001
    rng = random.Random(3)
    reads = [(f"r{i}", "".join(rng.choices("ACGT", k=rng.randint(300, 900))), None) for i in range(6)]
    outputs = []
    for name, layout in (("in.fa", as_fasta), ("in.fq.gz", lambda r: gzip.compress(as_fastq(r)))):
        (tmp_path / name).write_bytes(layout(reads))
        out = tmp_path / f"out-{name}"
        assert main(["translate", "--input", str(tmp_path / name), "--chunk-length", "300", "--out-dir", str(out)]) == 0
        outputs.append([(out / f).read_bytes() for f in ("chunked.fa", "identified_nucleotide.fa", "identified_protein.faa")])
    assert outputs[0] == outputs[1] and outputs[0][0]


def test_cli_translate_leaves_no_output_when_the_input_is_bad(tmp_path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "picture.fa").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for name, message in (("missing.fa", "does not exist or is not a file; check the path"), ("picture.fa", "PNG")):
        out = tmp_path / f"out-{name}"
        assert main(["translate", "--input", str(tmp_path / name), "--chunk-length", "300", "--out-dir", str(out)]) == 65
        assert message in capsys.readouterr().err
        assert not out.exists() or list(out.iterdir()) == []
