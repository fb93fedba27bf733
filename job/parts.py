"""A part: the output rows (and features) of consecutive reads of a shard, as stored.

Parts are written under keys unique to their writer, then committed into the shard's record;
the merge concatenates the committed parts in order. The rows are the final text lines
already, so the merge only copies bytes: the highestscore rows of a part are sorted, and
the merge interleaves the parts' sorted rows into one sorted file.

A part (format 2, key `.part`) is a first line `virnucpro-part 2`, a line of JSON (the
outcomes, counts, viral reads, frames, and the byte length of each text section), then the
reads.tsv, prediction_results.txt and highestscore rows as raw UTF-8 sections: the merge
hands those bytes on without decoding them into lines and encoding them again (at 10^6
reads that was a third of its CPU time). Parts of the previous release (format 1: one JSON
object, key `.json`) are still read, so a run it started can be finished or retried; a part
of any other format is refused with a message that names it.
"""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.outputs import ChunkConsensus, format_score, prediction_lines, reads_line, thresholded, virus_chunks
from job.errors import BadInput
from job.summary import RunStats

if TYPE_CHECKING:  # the merge and `status` read parts without loading torch
    from core.pipeline import ReadResult
    from job.plan import Plan, Shard


PART_MAGIC = b"virnucpro-part 2\n"
PART_SUFFIX = ".part"
SECTIONS = ("reads", "predictions", "highest")  # the raw text sections, in this order


@dataclass(frozen=True)
class PartRows:
    reads: bytes  # reads.tsv lines, UTF-8
    predictions: bytes  # prediction_results.txt lines, one per kept frame
    highest: bytes  # prediction_results_highestscore.csv lines, sorted by chunk id
    frames: int  # lines in `predictions`
    outcomes: dict[str, int]  # reads per call, or per reason for reads not called
    counts: dict[str, dict]  # the rows' counts per input (job/summary.py), added up by the merge
    # With --write-viral-reads: [id, sequence, max P(virus), input] of each read called virus.
    # The part carries them (not the merge re-reading the inputs): virus calls are a small
    # share of a sample's reads, while re-reading would fetch and parse every input again.
    viral: list[list[str]] | None = None

    @property
    def frame_ids(self) -> list[str]:
        return [line.split(b"\t", 1)[0].decode() for line in lines(self.predictions)]


def lines(text: bytes) -> list[bytes]:
    """The lines of a section, each with its newline (only b"\n" ends a line, as in the files)."""
    return _LINE.findall(text)


_LINE = re.compile(rb"[^\n]*\n")


def pack_rows(
    reads: list[str], predictions: list[str], highest: list[str], outcomes: dict[str, int], counts: dict[str, dict],
    viral: list[list[str]] | None,
) -> bytes:
    """A part's bytes (format 2) from its lines, each ending in a newline; `highest` sorted by chunk id."""
    sections = ["".join(text).encode() for text in (reads, predictions, highest)]
    header = {
        "sections": [len(section) for section in sections],
        "frames": len(predictions),
        "outcomes": outcomes,
        "counts": counts,
        "viral": viral,
    }
    return b"".join([PART_MAGIC, json.dumps(header, separators=(",", ":")).encode(), b"\n", *sections])


def _outcome(call: str, reason: str) -> str:
    """How `_SUCCESS` counts a read: its call, or why it has none."""
    return call if call != "none" else reason


def encode_rows(
    results: list[ReadResult], sources: list[str], chunk_length: int, min_virus_score: float | None = None,
    sequences: list[str] | None = None,
) -> tuple[bytes, int]:
    """The part's bytes (`pack_rows`), and its number of frames.

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
    viral_rows = viral if sequences is not None else None
    return pack_rows(reads, predictions, consensus.lines(), outcomes, counts.counts_json(), viral_rows), len(predictions)


def read_sources(plan: Plan, shard: Shard, start: int, count: int) -> list[str]:
    """The input file of each of the shard's reads start .. start + count."""
    sources: list[str] = []
    position = 0
    for segment in shard.segments:
        first, last = max(start, position), min(start + count, position + segment.count)
        sources.extend([plan.inputs[segment.input].uri] * max(last - first, 0))
        position += segment.count
    return sources


def decode_rows(data: bytes, key: str) -> PartRows:
    """A stored part, its text sections left as bytes; `key` names it in errors."""
    if data.startswith(PART_MAGIC):
        end = data.index(b"\n", len(PART_MAGIC))
        header = json.loads(data[len(PART_MAGIC):end])
        view, start, text = memoryview(data), end + 1, []
        for size in header.pop("sections"):
            text.append(view[start:start + size])
            start += size
        if start != len(data):
            raise BadInput(f"part {key} is truncated or damaged ({len(data)} bytes, its header says {start})")
        return PartRows(*(bytes(section) for section in text), **header)
    if data.startswith(b"{"):  # format 1, the previous release's: lists of lines in one JSON object
        body = json.loads(data)
        text = ("".join(body[name]).encode() for name in SECTIONS)
        return PartRows(*text, len(body["predictions"]), body["outcomes"], body["counts"], body.get("viral"))
    raise BadInput(
        f"part {key} is not in a part format this version of virnucpro reads ({data[:24]!r}...): the run was "
        "written by a newer version; finish it with that version"
    )


def encode_features(results: list[ReadResult]) -> bytes:
    """The part's feature rows, float32 [frames, dim], as .npy bytes (results scored with features)."""
    matrix = np.concatenate([r.features for r in results]).astype(np.float32, copy=False)
    buffer = io.BytesIO()
    np.save(buffer, matrix, allow_pickle=False)
    return buffer.getvalue()


def decode_features(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
