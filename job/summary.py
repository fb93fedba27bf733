"""Per-input counts of a run: each worker counts the reads.tsv rows of its part, the merge
adds the parts' counts (and counts the rows it writes itself, those of failed shards).

Everything here is a count or a fixed-size histogram, so memory does not grow with the
number of reads: `summary.tsv`, the short-read warning and the report's plots are all drawn
from these counts, never from a list of every score. Counting in the workers spreads the
per-row cost (benchmarks/summary_rows.py) over them instead of adding it to the merge.
"""
from __future__ import annotations

from bisect import bisect_right
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
# Warn when at least this share of an input's reads repeat ids met earlier in the run: the
# second file of a pair whose headers carry no mate number, and whose names do not tell the
# mates apart (job.inputs.pair_mates), loses every read to duplicate_id.
DUPLICATE_SHARE_WARNING = 0.5
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
    # Histograms as plain lists: one increment per read costs less than on numpy arrays.
    score_counts: list[list[int]] = field(default_factory=lambda: [[0] * SCORE_BINS for _ in range(2)])  # virus, others
    length_counts: list[list[int]] = field(default_factory=lambda: [[0] * (len(LENGTH_EDGES) + 1) for _ in CALLS])

    @property
    def scores(self) -> np.ndarray:
        """Reads per P(virus) bin, [virus, others] x SCORE_BINS."""
        return np.array(self.score_counts, np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Reads per length bin, CALLS x (len(LENGTH_EDGES) + 1)."""
        return np.array(self.length_counts, np.int64)

    def to_json(self) -> dict:
        return {**vars(self), "outcomes": dict(self.outcomes)}

    @classmethod
    def from_json(cls, body: dict) -> InputStats:
        return cls(**{**body, "outcomes": Counter(body["outcomes"])})

    def add(self, other: InputStats) -> None:
        self.reads += other.reads
        self.outcomes.update(other.outcomes)
        self.frames += other.frames
        self.virus_chunks += other.virus_chunks
        self.shorter += other.shorter
        self.much_shorter += other.much_shorter
        for mine, theirs in zip(self.score_counts + self.length_counts, other.score_counts + other.length_counts):
            mine[:] = [a + b for a, b in zip(mine, theirs)]


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
            stats.score_counts[call != "virus"][min(int(float(score) * SCORE_BINS), SCORE_BINS - 1)] += 1
        stats.length_counts[CALLS.index(call)][bisect_right(LENGTH_EDGES, n)] += 1

    def add_counts(self, counts: dict[str, dict]) -> None:
        """Counts per input as `counts_json` wrote them (a part's)."""
        for source, body in counts.items():
            self.inputs.setdefault(source, InputStats()).add(InputStats.from_json(body))

    def counts_json(self) -> dict[str, dict]:
        return {source: stats.to_json() for source, stats in self.inputs.items() if stats.reads}

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

    def duplicate_ids_warning(self) -> str | None:
        """The warning when most reads of an input repeat ids met earlier, with the likely cause and the fix."""
        flagged = [
            f"{name} ({100 * stats.outcomes['none:duplicate_id'] / stats.reads:.0f}% of {stats.reads} reads)"
            for name, stats in self.inputs.items()
            if stats.reads and stats.outcomes["none:duplicate_id"] >= DUPLICATE_SHARE_WARNING * stats.reads
        ]
        if not flagged:
            return None
        return (
            f"reads whose ids were met earlier in the run are listed as duplicate_id and not scored, in "
            f"{', '.join(flagged)}: if that is the second file of a pair whose headers carry no mate "
            "number, name the two files as a pair (x_1 and x_2, or x_R1 and x_R2, before the "
            "extensions) or give the mates ids ending in /1 and /2, and run again into another --output; "
            "otherwise the same reads were given twice, or the file repeats its own ids (make them "
            "unique, e.g. with `seqkit rename`)"
        )


def _share(part: int, whole: int) -> str:
    """A share of an input's reads; NA for an input with none (as reads.tsv's max_p_virus)."""
    return f"{part / whole:.4f}" if whole else "NA"
