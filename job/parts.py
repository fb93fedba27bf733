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

from core.outputs import ChunkConsensus, prediction_lines, reads_line

if TYPE_CHECKING:  # the merge and `status` read parts without loading torch
    from core.pipeline import ReadResult


@dataclass(frozen=True)
class PartRows:
    reads: list[str]  # reads.tsv lines
    predictions: list[str]  # prediction_results.txt lines, one per kept frame
    highest: list[str]  # prediction_results_highestscore.csv lines, sorted by chunk id
    outcomes: dict[str, int]  # reads per call, or per reason for reads not called

    @property
    def frame_ids(self) -> list[str]:
        return [line.split("\t", 1)[0] for line in self.predictions]


def _outcome(call: str, reason: str) -> str:
    """How `_SUCCESS` counts a read: its call, or why it has none."""
    return call if call != "none" else reason


def encode_rows(results: list[ReadResult]) -> tuple[bytes, int]:
    """The part's rows as JSON, and its number of frames."""
    consensus = ChunkConsensus()
    predictions: list[str] = []
    for result in results:
        predictions.extend(prediction_lines(result.frames))
        consensus.add(result.frames)
    body = {
        "reads": [reads_line(result.summary) for result in results],
        "predictions": predictions,
        "highest": consensus.lines(),
        "outcomes": Counter(_outcome(r.summary.call, r.summary.reason) for r in results),
    }
    return json.dumps(body, separators=(",", ":")).encode(), len(predictions)


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
