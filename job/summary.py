"""Per-input counts of a run, accumulated row by row while the merge writes `reads.tsv`.

Everything here is a count or a fixed-size histogram, so memory does not grow with the
number of reads: `summary.tsv`, the short-read warning and the report's plots are all drawn
from these counts, never from a list of every score.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SCORE_BINS = 20  # P(virus) histogram over [0, 1]
LENGTH_EDGES = (150, 300, 500, 1000, 3000, 10000)  # read-length bins: < 150, 150-299, ..., >= 10000
CALLS = ("virus", "others", "none")
RUN_ROW = "(all inputs)"
# A read is "much shorter" than the classifier's chunk length below half of it: such a read
# yields one short chunk, and the design's accuracy there is near chance (see SHORT_READS_FACT).
SHORT_SHARE_WARNING = 0.10  # warn when at least this share of an input's reads is much shorter
SHORT_READS_FACT = (
    "a benchmark report in the Broad Institute's fork of VirNucPro measured this design on "
    "150-bp reads at about 0.53 accuracy and ROC-AUC 0.55-0.67 (near chance), against about "
    "0.90 accuracy on 500-3000 bp reads"
)


@dataclass
class InputStats:
    """Counts of one input file (or of the whole run)."""

    reads: int = 0
    outcomes: Counter = field(default_factory=Counter)  # call, or "none:<reason>"
    frames: int = 0
    virus_chunks: int = 0
    shorter: int = 0  # reads shorter than the chunk length
    much_shorter: int = 0  # reads shorter than half the chunk length
    scores: np.ndarray = field(default_factory=lambda: np.zeros((2, SCORE_BINS), np.int64))  # virus, others
    lengths: np.ndarray = field(default_factory=lambda: np.zeros((len(CALLS), len(LENGTH_EDGES) + 1), np.int64))

    def add(self, other: InputStats) -> None:
        self.reads += other.reads
        self.outcomes.update(other.outcomes)
        self.frames += other.frames
        self.virus_chunks += other.virus_chunks
        self.shorter += other.shorter
        self.much_shorter += other.much_shorter
        self.scores += other.scores
        self.lengths += other.lengths


class RunStats:
    """Counts per input file, fed one reads.tsv row at a time."""

    def __init__(self, inputs: list[str], chunk_length: int) -> None:
        self.chunk_length = chunk_length
        self.inputs: dict[str, InputStats] = {uri: InputStats() for uri in inputs}

    def add_row(self, line: str) -> None:
        """One reads.tsv row (core.outputs.READS_HEADER's columns)."""
        _id, length, _chunks, frames, score, call, reason, chunks_virus, source = line.rstrip("\n").split("\t")
        stats = self.inputs.setdefault(source, InputStats())
        n = int(length)
        stats.reads += 1
        stats.outcomes[call if call != "none" else f"none:{reason}"] += 1
        stats.frames += int(frames)
        stats.virus_chunks += int(chunks_virus)
        stats.shorter += n < self.chunk_length
        stats.much_shorter += 2 * n < self.chunk_length
        if score != "NA":
            column = min(int(float(score) * SCORE_BINS), SCORE_BINS - 1)
            stats.scores[0 if call == "virus" else 1, column] += 1
        stats.lengths[CALLS.index(call), int(np.searchsorted(LENGTH_EDGES, n, side="right"))] += 1

    def total(self) -> InputStats:
        total = InputStats()
        for stats in self.inputs.values():
            total.add(stats)
        return total

    def rows(self) -> list[tuple[str, InputStats]]:
        """One row per input file, in the plan's order, then the run's."""
        return [*self.inputs.items(), (RUN_ROW, self.total())]

    def outcome_columns(self) -> list[str]:
        seen = set().union(*(stats.outcomes for stats in self.inputs.values()))
        return ["virus", "others"] + sorted(name for name in seen if name.startswith("none:"))

    def tsv(self) -> str:
        """summary.tsv: reads, reads by call and by reason (`none:<reason>`), frames, chunks
        called virus, and the shares of reads shorter than the chunk length and than half of it."""
        outcomes = self.outcome_columns()
        header = ["input", "reads", *outcomes, "frames", "virus_chunks", "share_shorter_than_chunk",
                  "share_shorter_than_half_chunk"]
        lines = ["\t".join(header) + "\n"]
        for name, stats in self.rows():
            cells = [name, stats.reads, *(stats.outcomes.get(o, 0) for o in outcomes), stats.frames,
                     stats.virus_chunks, _share(stats.shorter, stats.reads), _share(stats.much_shorter, stats.reads)]
            lines.append("\t".join(str(cell) for cell in cells) + "\n")
        return "".join(lines)

    def short_reads_warning(self) -> str | None:
        """The warning when many reads are much shorter than the chunk length, with the fact behind it."""
        flagged = [
            f"{name} ({100 * stats.much_shorter / stats.reads:.0f}% of {stats.reads} reads)"
            for name, stats in self.inputs.items()
            if stats.reads and stats.much_shorter >= SHORT_SHARE_WARNING * stats.reads
        ]
        if not flagged:
            return None
        return (
            f"reads much shorter than the classifier's {self.chunk_length}-bp chunks (under "
            f"{self.chunk_length // 2} bp) in {', '.join(flagged)}: their calls are unreliable; "
            f"{SHORT_READS_FACT}. Assemble short reads into contigs first, or read their calls with care"
        )


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.4f}" if whole else "0"
