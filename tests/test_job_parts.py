"""The stored part (job/parts.py): format 2 round trip, format 1 still read, anything else refused."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import job.merge
from job.errors import BadInput
from job.merge import _SortedRuns
from job.parts import PART_MAGIC, PartRows, decode_rows, lines, pack_rows

READS = ["r1\t150\t1\t1\t0.9\tvirus\t\t1\t/in.fa\n", "réad-2 ü\t90\t0\t0\t\tnone\tshort\t0\t/in.fa\n"]
PREDICTIONS = ["r1_chunk_1F1\tvirus\t0.1\t0.9\n", "r1_chunk_1R2\tothers\t0.7\t0.3\n"]
HIGHEST = ["r1_chunk_1\t0.1\t0.9\tvirus\n"]
OUTCOMES = {"virus": 1, "short": 1}
COUNTS = {"/in.fa": {"reads": 2, "virus": 1}}
VIRAL = [["r1", "ACGT", "0.9", "/in.fa"]]


def text(rows: list[str]) -> bytes:
    return "".join(rows).encode()


def test_a_part_round_trips_its_sections_as_bytes() -> None:
    data = pack_rows(READS, PREDICTIONS, HIGHEST, OUTCOMES, COUNTS, VIRAL)
    assert data.startswith(PART_MAGIC)
    rows = decode_rows(data, "_run/parts/00000/w-a1-0000.part")
    assert rows == PartRows(text(READS), text(PREDICTIONS), text(HIGHEST), 2, OUTCOMES, COUNTS, VIRAL)
    assert rows.frame_ids == ["r1_chunk_1F1", "r1_chunk_1R2"]
    assert lines(rows.reads) == [line.encode() for line in READS]
    empty = decode_rows(pack_rows([], [], [], {}, {}, None), "k")
    assert (empty.reads, empty.predictions, empty.highest, empty.frames, empty.viral) == (b"", b"", b"", 0, None)


def test_a_part_of_the_previous_release_reads_as_the_same_rows() -> None:
    """Format 1 (one JSON object of lists of lines): a run the previous release started merges."""
    legacy = {
        "reads": READS, "predictions": PREDICTIONS, "highest": HIGHEST,
        "outcomes": OUTCOMES, "viral": VIRAL, "counts": COUNTS,
    }
    key = "_run/parts/00000/w-a1-0000.json"
    assert decode_rows(json.dumps(legacy).encode(), key) == decode_rows(
        pack_rows(READS, PREDICTIONS, HIGHEST, OUTCOMES, COUNTS, VIRAL), key
    )


def test_an_unknown_or_damaged_part_is_refused_naming_it() -> None:
    key = "_run/parts/00003/w-a1-0002.part"
    with pytest.raises(BadInput, match=f"part {key} is not in a part format.*newer version"):
        decode_rows(b"virnucpro-part 3\n{}\n", key)
    whole = pack_rows(READS, PREDICTIONS, HIGHEST, OUTCOMES, COUNTS, None)
    for damaged in (whole[:-1], whole + b"x"):
        with pytest.raises(BadInput, match=f"part {key} is truncated or damaged"):
            decode_rows(damaged, key)


def test_runs_past_the_open_limit_merge_with_little_more_disk_than_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_OPEN_RUNS runs, a first pass merges only as many runs as the last pass cannot
    open: merging them in groups of MAX_OPEN_RUNS held up to 1.6x the rows on disk at 10^8 reads."""
    monkeypatch.setattr(job.merge, "RUN_ROWS", 10)
    monkeypatch.setattr(job.merge, "MAX_OPEN_RUNS", 8)
    runs = _SortedRuns(tmp_path / "runs")
    rows = [f"r{n:05d}_chunk_1\t0.5\t0.5\tothers\n".encode() for n in range(100)]  # 10 runs of equal size
    for start in range(0, len(rows), 10):
        runs.add(rows[start:start + 10])
    run_size = (tmp_path / "runs" / "000000.txt").stat().st_size
    peaks = []  # the disk in use each time a merged run is deleted: its pass's peak
    unlink = Path.unlink

    def measured(path: Path, *args: object) -> None:
        peaks.append(sum(f.stat().st_size for f in (tmp_path / "runs").iterdir()))
        unlink(path, *args)

    monkeypatch.setattr(Path, "unlink", measured)
    out = bytearray()
    assert runs.write_merged(out.extend) == len(rows) and bytes(out) == b"".join(rows)
    assert max(peaks) == 10 * run_size + 3 * run_size  # 10 - 8 + 1 = 3 runs merged first, not 8


def test_highest_rows_sorted_as_bytes_come_out_in_text_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge sorts UTF-8 bytes: the order must be that of the text (code points), across runs on disk."""
    monkeypatch.setattr(job.merge, "RUN_ROWS", 7)  # many runs, merged in levels
    monkeypatch.setattr(job.merge, "MAX_OPEN_RUNS", 3)
    monkeypatch.setattr(job.merge, "WRITE_ROWS", 11)  # blocks that end anywhere
    rng = random.Random(5)
    alphabet = "aAzé€ü\U0001f600_-.0"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(300)}
    rows = [f"{chunk}_chunk_1\t0.5\t0.5\tothers\n" for chunk in ids]
    rng.shuffle(rows)
    runs = _SortedRuns(tmp_path / "runs")
    for start in range(0, len(rows), 5):
        runs.add(sorted(line.encode() for line in rows[start:start + 5]))
    with open(tmp_path / "out", "wb") as out:
        assert runs.write_merged(out.write) == len(rows)
    expected = sorted(rows, key=lambda line: line.split("\t", 1)[0])
    assert (tmp_path / "out").read_text(encoding="utf-8").splitlines(keepends=True) == expected
