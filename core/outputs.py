"""Text of the output files: the published tool's formats byte for byte, and `reads.tsv`.

Scores: the published files' `score1` is P(others) and `score2` is P(virus), the classifier's
softmax for one frame; `reads.tsv` names the read's best `score2` `max_p_virus`.

Only formatting lives here; where the bytes go (a local directory, S3 parts and a merge)
is the job's business.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from core.frames import Chunk, Frame

PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
HIGHEST_HEADER = "Modified_ID\tIs_Virus\n"
READS_HEADER = "read_id\tlength\tchunks\tkept_frames\tmax_p_virus\tcall\treason\tvirus_chunks\tinput\n"
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

    def calls(self, min_virus_score: float | None = None) -> dict[str, bool]:
        """Chunk -> virus?, by the published rule, or max P(virus) >= min_virus_score when given."""
        if min_virus_score is None:
            return {chunk: bool(virus >= others) for chunk, (others, virus) in self._best.items()}
        threshold = np.float32(min_virus_score)
        return {chunk: bool(virus >= threshold) for chunk, (_others, virus) in self._best.items()}

    def lines(self) -> list[str]:
        """prediction_results_highestscore.csv rows, sorted by chunk id (plain string order)."""
        calls = self.calls()
        return [f"{chunk}\t{calls[chunk]}\n" for chunk in sorted(calls)]


def virus_chunks(frames: Iterable[FrameScore], min_virus_score: float | None) -> int:
    """Chunks of one read called virus: by the published rule (max P(virus) >= max
    P(others) over the chunk's frames), or, given a threshold, max P(virus) >= it."""
    consensus = ChunkConsensus()
    consensus.add(frames)
    return sum(consensus.calls(min_virus_score).values())


def thresholded(summary: ReadSummary, min_virus_score: float | None) -> ReadSummary:
    """The read's call under --min-virus-score: virus when its max P(virus) >= the threshold,
    compared in float32 (the scores' type), so a threshold copied from reads.tsv is exact.
    Without a threshold the published rule stands (a read is virus when any chunk is)."""
    if min_virus_score is None or summary.max_virus_score is None:
        return summary
    call = "virus" if summary.max_virus_score >= np.float32(min_virus_score) else "others"
    return replace(summary, call=call)


def reads_line(summary: ReadSummary, chunks_virus: int = 0, source: str = "") -> str:
    """One reads.tsv row: the summary, its chunks called virus and its input file."""
    score = "NA" if summary.max_virus_score is None else format_score(summary.max_virus_score)
    return (
        f"{summary.read_id}\t{summary.length}\t{summary.chunks}\t{summary.kept_frames}"
        f"\t{score}\t{summary.call}\t{summary.reason}\t{chunks_virus}\t{source}\n"
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


def viral_fasta(reads: Iterable[list[str]]) -> Iterator[str]:
    """viral_reads.fa.gz records from [id, sequence, max P(virus), input]: the whole read,
    wrapped at 60 columns, its best P(virus) and its input file in the header."""
    for read_id, sequence, score, source in reads:
        body = "".join(f"{sequence[i:i + FASTA_WIDTH]}\n" for i in range(0, len(sequence), FASTA_WIDTH))
        yield f">{read_id} max_p_virus={score} input={source}\n{body}"
