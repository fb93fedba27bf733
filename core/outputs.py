"""Text of the output files: the published tool's formats byte for byte, and `reads.tsv`.

Only formatting lives here; where the bytes go (a local directory, S3 parts and a merge)
is the job's business.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from core.frames import Chunk, Frame

PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
HIGHEST_HEADER = "Modified_ID\tIs_Virus\n"
READS_HEADER = "read_id\tlength\tchunks\tkept_frames\tmax_virus_score\tcall\treason\n"
FASTA_WIDTH = 60


@dataclass(frozen=True)
class FrameScore:
    """Softmax of the classifier for one kept frame: P(others), P(virus)."""

    frame_id: str
    score_others: np.float32
    score_virus: np.float32

    @property
    def chunk_id(self) -> str:
        return self.frame_id[:-2]


@dataclass(frozen=True)
class ReadSummary:
    """One row of reads.tsv: what became of one input read."""

    read_id: str
    length: int
    chunks: int
    kept_frames: int
    max_virus_score: np.float32 | None
    call: str  # virus | others | none
    reason: str  # empty when called; else why not (empty, too_short, no_open_frame, ...)


def format_score(value: np.float32) -> str:
    """float32 shortest repr, as the published tool prints scores (e.g. 0.12100612)."""
    return str(np.float32(value))


def prediction_lines(frames: Iterable[FrameScore]) -> Iterator[str]:
    for frame in frames:
        call = "virus" if frame.score_virus > frame.score_others else "others"
        yield (
            f"{frame.frame_id}\t{call}\t{format_score(frame.score_others)}"
            f"\t{format_score(frame.score_virus)}\n"
        )


class ChunkConsensus:
    """Per-chunk consensus, fed frame by frame so a whole run never sits in memory.

    A chunk is virus when max P(virus) >= max P(others) over its frames (ties: virus).
    """

    def __init__(self) -> None:
        self._best: dict[str, tuple[np.float32, np.float32]] = {}

    def add(self, frames: Iterable[FrameScore]) -> None:
        for frame in frames:
            others, virus = self._best.get(frame.chunk_id, (frame.score_others, frame.score_virus))
            self._best[frame.chunk_id] = (
                max(others, frame.score_others),
                max(virus, frame.score_virus),
            )

    def calls(self) -> dict[str, bool]:
        return {chunk: bool(virus >= others) for chunk, (others, virus) in self._best.items()}

    def lines(self) -> list[str]:
        """prediction_results_highestscore.csv rows, sorted by chunk id (plain string order)."""
        calls = self.calls()
        return [f"{chunk}\t{calls[chunk]}\n" for chunk in sorted(calls)]


def chunk_calls(frames: Iterable[FrameScore]) -> dict[str, bool]:
    consensus = ChunkConsensus()
    consensus.add(frames)
    return consensus.calls()


def reads_line(summary: ReadSummary) -> str:
    score = "NA" if summary.max_virus_score is None else format_score(summary.max_virus_score)
    return (
        f"{summary.read_id}\t{summary.length}\t{summary.chunks}\t{summary.kept_frames}"
        f"\t{score}\t{summary.call}\t{summary.reason}\n"
    )


def chunk_fasta(chunks: Iterable[Chunk]) -> Iterator[str]:
    """Chunked FASTA wrapped at 60 columns, case preserved."""
    for chunk in chunks:
        seq = chunk.sequence
        body = "".join(f"{seq[i:i + FASTA_WIDTH]}\n" for i in range(0, len(seq), FASTA_WIDTH))
        yield f">{chunk.id}\n{body}"


def frame_fasta(frames: Iterable[Frame], protein: bool) -> Iterator[str]:
    """identified_nucleotide.fa / identified_protein.faa: one unwrapped line per frame."""
    for frame in frames:
        yield f">{frame.id}\n{frame.protein if protein else frame.nucleotide}\n"
