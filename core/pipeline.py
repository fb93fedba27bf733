"""Where a read becomes a score: chunks -> open frames -> two embeddings -> classifier.

`Predictor.predict` takes records in input order and yields one `ReadResult` per record,
in the same order, including records that could not be scored (with the reason why).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from core.classifier import Classifier, check_chunk_length, load_classifier
from core.dnabert import DNABERTEncoder, load_dnabert
from core.errors import ModelLoadError
from core.esm2 import ESM2Encoder, load_esm2
from core.fasta import Record
from core.frames import chunk_record, open_frames
from core.outputs import FrameScore, ReadSummary, chunk_calls

PUBLISHED_DNA_DIM = 768  # DNABERT-S
PUBLISHED_PROTEIN_DIM = 2560  # ESM-2 3B


@dataclass(frozen=True)
class ReadResult:
    summary: ReadSummary
    frames: list[FrameScore]
    features: np.ndarray | None  # [len(frames), dna_dim + protein_dim] float32, DNA first


class Predictor:
    """The published VirNucPro computation over batches of reads."""

    def __init__(
        self,
        dnabert: DNABERTEncoder,
        esm: ESM2Encoder,
        classifier: Classifier,
        chunk_length: int,
        group_reads: int = 512,
    ) -> None:
        if classifier.input_dim != dnabert.dim + esm.dim:
            raise ModelLoadError(
                f"the classifier expects {classifier.input_dim} features but DNABERT-S "
                f"({dnabert.dim}) + ESM-2 ({esm.dim}) give {dnabert.dim + esm.dim}; "
                "use the classifier trained for these encoders"
            )
        self.dnabert, self.esm, self.classifier = dnabert, esm, classifier
        self.chunk_length = chunk_length
        self.group_reads = group_reads

    @property
    def is_demo(self) -> bool:
        """True unless the encoders have the published sizes: scores are then meaningless."""
        return (self.dnabert.dim, self.esm.dim) != (PUBLISHED_DNA_DIM, PUBLISHED_PROTEIN_DIM)

    def predict(self, records: Iterable[Record], with_features: bool = False) -> Iterator[ReadResult]:
        records = iter(records)
        while group := list(islice(records, self.group_reads)):
            yield from self._predict_group(group, with_features)

    def _predict_group(self, records: list[Record], with_features: bool) -> Iterator[ReadResult]:
        chunks = {
            i: chunk_record(r.id, r.sequence, self.chunk_length)
            for i, r in enumerate(records)
            if r.status is None and len(r.sequence) >= 3
        }
        flat = [chunk for read_chunks in chunks.values() for chunk in read_chunks]
        frames = [frame for chunk_frames in open_frames(flat) for frame in chunk_frames]
        features, probabilities = self._score([f.nucleotide for f in frames], [f.protein for f in frames])
        by_chunk: dict[str, list[int]] = {}
        for row, frame in enumerate(frames):
            by_chunk.setdefault(frame.chunk_id, []).append(row)
        for i, record in enumerate(records):
            rows = [row for chunk in chunks.get(i, []) for row in by_chunk.get(chunk.id, [])]
            scores = [
                FrameScore(frames[row].id, probabilities[row, 0], probabilities[row, 1]) for row in rows
            ]
            yield ReadResult(
                _summarize(record, len(chunks.get(i, [])), scores),
                scores,
                features[rows] if with_features else None,
            )

    def _score(self, nucleotides: list[str], proteins: list[str]) -> tuple[np.ndarray, np.ndarray]:
        width = self.dnabert.dim + self.esm.dim
        if not nucleotides:
            return np.zeros((0, width), np.float32), np.zeros((0, 2), np.float32)
        features = torch.cat([self.dnabert.embed(nucleotides), self.esm.embed(proteins)], dim=1)
        probabilities = self.classifier.score(features)
        return features.numpy(), probabilities.numpy()


def _summarize(record: Record, n_chunks: int, scores: list[FrameScore]) -> ReadSummary:
    length = len(record.sequence)
    if record.status is not None:
        return ReadSummary(record.id, length, 0, 0, None, "none", record.status)
    if length < 3:
        return ReadSummary(record.id, length, n_chunks, 0, None, "none", "too_short")
    if not scores:
        return ReadSummary(record.id, length, n_chunks, 0, None, "none", "no_open_frame")
    call = "virus" if any(chunk_calls(scores).values()) else "others"
    best = max(score.score_virus for score in scores)
    return ReadSummary(record.id, length, n_chunks, len(scores), best, call, "")


def resolve_device(device: str) -> torch.device:
    """auto -> the GPU when there is one, else the CPU; cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def load_predictor(
    esm_model: str,
    dnabert_model: str,
    classifier: str,
    chunk_length: int | None = None,
    force_chunk_length: bool = False,
    device: str = "auto",
    batch_tokens: int | None = None,
) -> Predictor:
    """Load the three models from local paths (or names the libraries can resolve)."""
    target = resolve_device(device)
    scorer = load_classifier(classifier, target)
    length = check_chunk_length(scorer, chunk_length, force_chunk_length)
    return Predictor(
        load_dnabert(dnabert_model, target, batch_tokens),
        load_esm2(esm_model, target, batch_tokens),
        scorer,
        length,
    )
