"""Output formats: the published consensus rule and score printing."""
from __future__ import annotations

import numpy as np
import pytest

from core.outputs import (
    HIGHEST_HEADER, PREDICTION_HEADER, ChunkConsensus, FrameScore, ReadSummary, format_score,
    prediction_lines, reads_line,
)


def _read_predictions(path) -> list[FrameScore]:
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == PREDICTION_HEADER
    frames = []
    for line in lines[1:]:
        frame_id, _, s1, s2 = line.rstrip("\n").split("\t")
        frames.append(FrameScore(frame_id, np.float32(s1), np.float32(s2)))
    return frames


@pytest.mark.parametrize("name", ["test_with_orfs", "test_fixed_500bp"])
def test_reference_rows_round_trip_and_consensus(name: str, reference) -> None:
    outputs = reference / f"{name}_outputs"
    frames = _read_predictions(outputs / "prediction_results.txt")
    # re-printing the parsed scores gives the published bytes (float32 shortest repr)
    assert PREDICTION_HEADER + "".join(prediction_lines(frames)) == (outputs / "prediction_results.txt").read_text()
    consensus = ChunkConsensus()
    consensus.add(frames)
    expected = (outputs / "prediction_results_highestscore.csv").read_text()
    assert HIGHEST_HEADER + "".join(consensus.lines()) == expected


def test_consensus_ties_go_to_virus_and_rows_sort_as_strings() -> None:
    consensus = ChunkConsensus()
    consensus.add([
        FrameScore("b_chunk_1F1", np.float32(0.5), np.float32(0.5)),
        FrameScore("a_chunk_10R1", np.float32(0.9), np.float32(0.1)),
        FrameScore("a_chunk_10R2", np.float32(0.2), np.float32(0.8)),  # max virus 0.8 < max others 0.9
        FrameScore("a_chunk_2F3", np.float32(0.3), np.float32(0.7)),
    ])
    assert consensus.lines() == ["a_chunk_10\tFalse\n", "a_chunk_2\tTrue\n", "b_chunk_1\tTrue\n"]


def test_prediction_call_needs_a_strictly_larger_virus_score() -> None:
    line, = prediction_lines([FrameScore("x_chunk_1F1", np.float32(0.5), np.float32(0.5))])
    assert line == "x_chunk_1F1\tothers\t0.5\t0.5\n"
    assert format_score(np.float32(0.12100612)) == "0.12100612"


def test_reads_line_marks_missing_score() -> None:
    line = reads_line(ReadSummary("r", 2, 1, 0, None, "none", "too_short"), 0, "s3://b/x.fq.gz")
    assert line == "r\t2\t1\t0\tNA\tnone\ttoo_short\t0\ts3://b/x.fq.gz\n"
