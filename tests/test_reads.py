"""The FASTA reader on good and malformed input: documented errors and per-read statuses."""
from __future__ import annotations

import gzip
import io
import tracemalloc

import pytest

from core.reads import ReadsError, Record, mark_duplicates, read_records
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


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        (b"ACGT\n>r\nAC\n", 1, "text before the first record"),
        (b">r1\nACGT\n>\nAC\n", 3, "no id"),
        (b">r1\nAC\x00\x01\x02GT\n", 2, "binary"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, "this is a PNG image"),
        (b">r1\nACGT\n>\xff\xfe\nAC\n", 3, "not UTF-8"),
    ],
)
def test_structural_damage_names_file_line_and_fix(data: bytes, line: int, words: str) -> None:
    with pytest.raises(ReadsError) as error:
        records(data, "sample.fa")
    message = str(error.value)
    assert message.startswith(f"sample.fa, line {line}:") and words in message
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
