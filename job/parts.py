"""A part: the output rows (and features) of consecutive reads of a shard, as stored.

Parts are written under keys unique to their writer, then committed into the shard's record;
the merge concatenates the committed parts in order. The rows are the final text lines
already, so the merge only copies bytes: the highestscore rows of a part are sorted, and
the merge interleaves the parts' sorted rows into one sorted file.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.outputs import ChunkConsensus, format_score, prediction_lines, reads_line, thresholded, virus_chunks
from job.summary import RunStats

if TYPE_CHECKING:  # the merge and `status` read parts without loading torch
    from core.pipeline import ReadResult
    from job.plan import Plan, Shard


@dataclass(frozen=True)
class PartRows:
    reads: list[str]  # reads.tsv lines
    predictions: list[str]  # prediction_results.txt lines, one per kept frame
    highest: list[str]  # prediction_results_highestscore.csv lines, sorted by chunk id
    outcomes: dict[str, int]  # reads per call, or per reason for reads not called
    counts: dict[str, dict]  # the rows' counts per input (job/summary.py), added up by the merge
    # With --write-viral-reads: [id, sequence, max P(virus), input] of each read called virus.
    # The part carries them (not the merge re-reading the inputs): virus calls are a small
    # share of a sample's reads, while re-reading would fetch and parse every input again.
    viral: list[list[str]] | None = None

    @property
    def frame_ids(self) -> list[str]:
        return [line.split("\t", 1)[0] for line in self.predictions]


def _outcome(call: str, reason: str) -> str:
    """How `_SUCCESS` counts a read: its call, or why it has none."""
    return call if call != "none" else reason


def encode_rows(
    results: list[ReadResult], sources: list[str], chunk_length: int, min_virus_score: float | None = None,
    sequences: list[str] | None = None,
) -> tuple[bytes, int]:
    """The part's rows as JSON, and its number of frames.

    `sources`: each read's input file; `min_virus_score`: the run's threshold (None: the
    published rule); `sequences`: the reads' letters, given with --write-viral-reads.
    """
    counts = RunStats([], chunk_length)
    consensus = ChunkConsensus()
    predictions: list[str] = []
    reads: list[str] = []
    outcomes: Counter[str] = Counter()
    viral: list[list[str]] = []
    for i, result in enumerate(results):
        predictions.extend(prediction_lines(result.frames))
        consensus.add(result.frames)
        summary = thresholded(result.summary, min_virus_score)
        reads.append(reads_line(summary, virus_chunks(result.frames, min_virus_score), sources[i]))
        counts.add_row(reads[-1])
        outcomes[_outcome(summary.call, summary.reason)] += 1
        if sequences is not None and summary.call == "virus":
            viral.append([summary.read_id, sequences[i], format_score(summary.max_virus_score), sources[i]])
    body = {
        "reads": reads,
        "predictions": predictions,
        "highest": consensus.lines(),
        "outcomes": outcomes,
        "viral": viral if sequences is not None else None,
        "counts": counts.counts_json(),
    }
    return json.dumps(body, separators=(",", ":")).encode(), len(predictions)


def read_sources(plan: Plan, shard: Shard, start: int, count: int) -> list[str]:
    """The input file of each of the shard's reads start .. start + count."""
    sources: list[str] = []
    position = 0
    for segment in shard.segments:
        first, last = max(start, position), min(start + count, position + segment.count)
        sources.extend([plan.inputs[segment.input].uri] * max(last - first, 0))
        position += segment.count
    return sources


def decode_rows(data: bytes) -> PartRows:
    return PartRows(**json.loads(data))


def encode_features(results: list[ReadResult]) -> bytes:
    """The part's feature rows, float32 [frames, dim], as .npy bytes (results scored with features)."""
    matrix = np.concatenate([r.features for r in results]).astype(np.float32, copy=False)
    buffer = io.BytesIO()
    np.save(buffer, matrix, allow_pickle=False)
    return buffer.getvalue()


def decode_features(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
