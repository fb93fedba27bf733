"""Where a read becomes a score: chunks -> open frames -> two embeddings -> classifier.

`Predictor.predict` takes records in input order and yields one `ReadResult` per record,
in the same order, including records that could not be scored (with the reason why).
"""
from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from core.classifier import Classifier, check_chunk_length, load_classifier
from core.dnabert import DNABERTEncoder, load_dnabert
from core.engine import ConvertedWeights
from core.errors import ModelLoadError, NonFiniteEmbedding
from core.esm2 import ESM2, ESM2Encoder, esm2_encoder, load_esm2_model
from core.memo import MEMO_SEQUENCES, EmbeddingMemo, Lookup
from core.reads import Record
from core.frames import Frame, chunk_record, open_frames
from core.outputs import FrameScore, ReadSummary, virus_chunks

PUBLISHED_DNA_DIM = 768  # DNABERT-S
PUBLISHED_PROTEIN_DIM = 2560  # ESM-2 3B


@dataclass(frozen=True)
class ReadResult:
    summary: ReadSummary
    frames: list[FrameScore]
    features: np.ndarray | None  # [len(frames), dna_dim + protein_dim] float32, DNA first


@dataclass
class _Memos:
    """A shard's embeddings by sequence, one memo per encoder (`core.memo`)."""

    dna: EmbeddingMemo
    protein: EmbeddingMemo


@dataclass
class _Embedding:
    """One encoder's part of a group: what it embeds, and where each distinct sequence's
    embedding comes from (with reuse; without, every frame's sequence is embedded)."""

    prepared: list  # the encoder's prepared (tokenized, packed, pinned) batches, one per call
    lookup: Lookup | None = None


@dataclass
class _Group:
    """One group of reads on its way through the predictor.

    With reuse, frame i takes the scores of frame `first_equal[i]`, the group's first frame
    with the same nucleotides and protein (None: without reuse).
    """

    records: list[Record]
    chunks: dict[int, list]
    frames: list[Frame]
    dna: _Embedding | None = None
    protein: _Embedding | None = None
    first_equal: np.ndarray | None = None
    indices: torch.Tensor | None = None  # every index array the device needs, in one pinned tensor
    features: torch.Tensor | None = None  # on the device once launched
    probabilities: torch.Tensor | None = None
    finite: torch.Tensor | None = None
    done: torch.cuda.Event | None = None  # set when the copies back to the host are complete


class Predictor:
    """The published VirNucPro computation over batches of reads.

    On a GPU, `predict` is a software pipeline on the calling thread: while the GPU runs
    group g (queued without any host sync: DNABERT-S, ESM-2, concatenation, classifier,
    and the copies of the results into pinned host memory), the host reads, chunks,
    translates, tokenizes and packs group g + 1 and queues it behind g; only then does it
    wait for g's results and yield them. One thread, so the GIL never slows the kernel
    launches. On the CPU the groups run one after another. `timings` accumulates where the
    host spent its time (seconds), for `benchmarks/bench.py`.

    Reuse (`reuse=True`, the default): within one `predict` call (a shard), each distinct
    nucleotide slice and each distinct protein is embedded once and its embedding used for
    every frame that has it, in that group and in later ones (`core.memo`: at most
    `memo_sequences` of each, least recently used dropped first). The classifier still
    scores all the group's frames in one batch, as without reuse (on a GPU its kernels round
    a row by the batch's shape), and equal frames of a group take the first one's scores:
    equal scores by construction. Equal frames of different groups have bit-equal features;
    on a GPU their scores can differ in the last digits, as before. Which sequences are
    embedded in which packed batch depends only on the shard's reads, never on timing: a
    run is as deterministic as before.

    What a resume changes (the worker resumes a shard at a committed group boundary and
    passes the reads before it as `earlier`): the memo learns their sequences but not their
    embeddings, so every later group embeds the same new sequences in the same batches as
    an uninterrupted run; only a sequence first met before the resume point and met again
    after it is embedded anew, apart. On the CPU (fp32) an embedding, and a frame's scores, do
    not depend on the rest of the batch (`core.packing.prepare_batches` and
    `Classifier.score` run one sequence, one row, at a time there; `tests/test_reuse.py`
    checks it), so a resumed shard is byte-identical. On a GPU the last bits of a kernel's
    result may depend on the batch's composition: there the frames having such a sequence
    may differ in the last digits from an uninterrupted run; every other frame is
    byte-identical. Scoping the memo to commits instead would tie results to the checkpoint
    timer, and a memo per group finds few of the repeats real data has. `reuse=False` embeds every frame's sequences (for
    benchmarks; the results of before, bit for bit).
    """

    def __init__(
        self,
        dnabert: DNABERTEncoder,
        esm: ESM2Encoder,
        classifier: Classifier,
        chunk_length: int,
        group_reads: int = 512,
        pipelined: bool | None = None,
        reuse: bool = True,
        memo_sequences: int = MEMO_SEQUENCES,
    ) -> None:
        check_widths(classifier.input_dim, dnabert.dim, esm.dim)
        self.dnabert, self.esm, self.classifier = dnabert, esm, classifier
        self.chunk_length = chunk_length
        self.group_reads = group_reads
        self.pipelined = esm.device.type == "cuda" if pipelined is None else pipelined
        self.reuse, self.memo_sequences = reuse, memo_sequences
        self.timings = dict.fromkeys(("prepare", "launch", "wait", "results"), 0.0)

    @property
    def engine(self) -> dict[str, object]:
        """What runs where, for the log: each encoder's precision, attention backend, compile
        state, token budget per packed batch, and whether repeated sequences are reused."""
        return {"dnabert": self.dnabert.backend, "esm": self.esm.backend,
                "device": str(self.esm.device), "batch_tokens": self.esm.batch_tokens, "reuse": self.reuse}

    @property
    def compiled(self) -> bool:
        """Whether either encoder runs torch.compile'd (and so has something to warm up)."""
        return bool(self.dnabert.compile or self.esm.compile)

    def warm_up(self, stop: threading.Event | None = None) -> float:
        """Compile both encoders for every batch shape they will meet; seconds spent (about
        zero unless they run compiled). Without it, the first minutes of a run pay for
        compilation batch by batch. Returns early, between shapes, once `stop` is set."""
        started = time.perf_counter()
        self.dnabert.warm_up(stop)
        self.esm.warm_up(stop)
        return time.perf_counter() - started

    def predict(
        self, records: Iterable[Record], with_features: bool = False, earlier: Iterable[Record] = ()
    ) -> Iterator[ReadResult]:
        """One ReadResult per record of `records`, in order. `earlier`: the reads of the same
        shard scored before these (a resumed shard's committed reads, whole groups), read to
        the end before `records` is touched; they are not scored (see the class)."""
        memos = None
        if self.reuse:
            device = self.esm.device
            memos = _Memos(EmbeddingMemo(self.memo_sequences, self.dnabert.dim, device),
                           EmbeddingMemo(self.memo_sequences, self.esm.dim, device))
        earlier = iter(earlier)
        while group_records := list(islice(earlier, self.group_reads)):
            if memos is not None:
                frames = self._frames(group_records)[1]
                memos.dna.remember(_distinct([f.nucleotide for f in frames])[0])
                memos.protein.remember(_distinct([f.protein for f in frames])[0])
        records = iter(records)
        pending: _Group | None = None  # queued on the device, results not yet taken
        while True:
            try:  # host work for the next group, while the device runs `pending`
                started = time.perf_counter()
                group_records = list(islice(records, self.group_reads))
                group = self._prepare(group_records, memos) if group_records else None
                self.timings["prepare"] += time.perf_counter() - started
            except Exception:
                if pending is not None:  # what was read before the bad record is still answered
                    yield from self._collect(pending, with_features)
                raise
            if group is not None:
                started = time.perf_counter()
                self._launch(group, with_features, memos)
                self.timings["launch"] += time.perf_counter() - started
            if pending is not None:
                yield from self._collect(pending, with_features)
            if group is None:
                return
            if self.pipelined:
                pending = group
            else:
                yield from self._collect(group, with_features)

    def _frames(self, records: list[Record]) -> tuple[dict[int, list], list[Frame]]:
        """The chunks of each scorable record (by its place in `records`) and all their open frames."""
        chunks = {
            i: chunk_record(r.id, r.sequence, self.chunk_length)
            for i, r in enumerate(records)
            if r.status is None
        }
        flat = [chunk for read_chunks in chunks.values() for chunk in read_chunks]
        return chunks, [frame for chunk_frames in open_frames(flat) for frame in chunk_frames]

    def _prepare(self, records: list[Record], memos: _Memos | None) -> _Group:
        """Host work for one group: chunks, open frames, what to embed, tokenized and packed."""
        group = _Group(records, *self._frames(records))
        frames = group.frames
        if not frames:
            return group
        nucleotides, proteins = [f.nucleotide for f in frames], [f.protein for f in frames]
        if memos is None:
            group.dna = _Embedding([self.dnabert.prepare(nucleotides)])
            group.protein = _Embedding([self.esm.prepare(proteins)])
            return group
        dna_keys, dna_of_frame = _distinct(nucleotides)
        protein_keys, protein_of_frame = _distinct(proteins)
        _, frame_pair = _distinct((dna_of_frame * len(protein_keys) + protein_of_frame).tolist())
        first = np.full(len(frames), len(frames), np.int64)
        np.minimum.at(first, frame_pair, np.arange(len(frames)))
        group.first_equal = first[frame_pair]
        group.dna = self._embedding(self.dnabert, memos.dna.plan(dna_keys))
        group.protein = self._embedding(self.esm, memos.protein.plan(protein_keys))
        arrays = [*group.dna.lookup.indices(), *group.protein.lookup.indices(), dna_of_frame, protein_of_frame]
        indices = torch.from_numpy(np.concatenate(arrays))
        group.indices = indices.pin_memory() if self.esm.device.type == "cuda" else indices
        return group

    @staticmethod
    def _embedding(encoder: DNABERTEncoder | ESM2Encoder, lookup: Lookup) -> _Embedding:
        """The new sequences packed together (the batches any run over these reads forms), the
        recovered ones apart."""
        return _Embedding([encoder.prepare(batch) for batch in (lookup.new, lookup.recovered) if batch], lookup)

    def _launch(self, group: _Group, with_features: bool, memos: _Memos | None) -> None:
        """Queue the group's device work and the copies of its results back to the host."""
        if not group.frames:
            return
        if memos is None:
            dna, dna_ok = self.dnabert.run(group.dna.prepared[0])
            protein, protein_ok = self.esm.run(group.protein.prepared[0])
            finite = dna_ok & protein_ok
        else:
            lengths = [len(a) for a in group.dna.lookup.indices() + group.protein.lookup.indices()]
            count = len(group.frames)
            pieces = torch.split(group.indices.to(self.esm.device, non_blocking=True), [*lengths, count, count])
            dna_rows = self._embedded(self.dnabert, group.dna, memos.dna, list(pieces[:5]))
            protein_rows = self._embedded(self.esm, group.protein, memos.protein, list(pieces[5:10]))
            with torch.inference_mode():
                dna, protein = dna_rows[pieces[10]], protein_rows[pieces[11]]
            finite = None
        group.dna = group.protein = group.indices = None
        with torch.inference_mode():
            features = torch.cat([dna, protein], dim=1)
            probabilities = self.classifier.score(features)
            if finite is None:
                finite = torch.isfinite(features).all(dim=1)
        on_gpu = features.device.type == "cuda"
        group.probabilities = probabilities.to("cpu", non_blocking=on_gpu)
        group.finite = finite.to("cpu", non_blocking=on_gpu)
        group.features = features.to("cpu", non_blocking=on_gpu) if with_features else None
        if on_gpu:
            group.done = torch.cuda.Event()
            group.done.record()

    @staticmethod
    def _embedded(encoder: DNABERTEncoder | ESM2Encoder, embedding: _Embedding, memo: EmbeddingMemo,
                  indices: list[torch.Tensor]) -> torch.Tensor:
        """The embedding of each distinct sequence of the group, on the device: the fresh
        ones run through the encoder, the others from the memo."""
        runs = [encoder.run(prepared)[0] for prepared in embedding.prepared]
        if not runs:
            fresh = torch.empty(0, encoder.dim, dtype=torch.float32, device=encoder.device)
        else:
            fresh = runs[0] if len(runs) == 1 else torch.cat(runs)
        return memo.gather(embedding.lookup, indices, fresh)

    def _collect(self, group: _Group, with_features: bool) -> Iterator[ReadResult]:
        """Wait for the group's results and yield one ReadResult per record, in input order."""
        frames, chunks = group.frames, group.chunks
        width = self.dnabert.dim + self.esm.dim
        started = time.perf_counter()
        if group.done is not None:
            group.done.synchronize()
        self.timings["wait"] += time.perf_counter() - started
        started = time.perf_counter()
        if frames:
            finite = group.finite.numpy()
            probabilities = group.probabilities.numpy()
            features = group.features.numpy() if with_features else None
            if group.first_equal is not None:  # equal frames, equal scores: the first one's
                probabilities = probabilities[group.first_equal]
            if not finite.all():
                bad = np.flatnonzero(~finite).tolist()
                raise NonFiniteEmbedding("DNABERT-S/ESM-2", bad, [frames[i].id for i in bad])
        else:
            probabilities = np.zeros((0, 2), np.float32)
            features = np.zeros((0, width), np.float32) if with_features else None
        by_chunk: dict[str, list[int]] = {}
        for row, frame in enumerate(frames):
            by_chunk.setdefault(frame.chunk_id, []).append(row)
        results = []
        for i, record in enumerate(group.records):
            rows = [row for chunk in chunks.get(i, []) for row in by_chunk.get(chunk.id, [])]
            scores = [
                FrameScore(frames[row].id, probabilities[row, 0], probabilities[row, 1]) for row in rows
            ]
            results.append(ReadResult(
                _summarize(record, len(chunks.get(i, [])), scores),
                scores,
                features[rows] if with_features else None,
            ))
        self.timings["results"] += time.perf_counter() - started
        yield from results


def _distinct(items: list[Hashable]) -> tuple[list, np.ndarray]:
    """The distinct items in the order they first occur, and each item's index among them."""
    index: dict = {}
    rows = np.fromiter((index.setdefault(item, len(index)) for item in items), np.int64, count=len(items))
    return list(index), rows


def _summarize(record: Record, n_chunks: int, scores: list[FrameScore]) -> ReadSummary:
    length = len(record.sequence)
    if record.status is not None:
        return ReadSummary(record.id, length, 0, 0, None, "none", record.status)
    if length < 3:
        return ReadSummary(record.id, length, n_chunks, 0, None, "none", "too_short")
    if not scores:
        return ReadSummary(record.id, length, n_chunks, 0, None, "none", "no_open_frame")
    call = "virus" if virus_chunks(scores, None) else "others"  # the published rule: any chunk virus
    best = max(score.score_virus for score in scores)
    return ReadSummary(record.id, length, n_chunks, len(scores), best, call, "")


def resolve_device(device: str) -> torch.device:
    """auto -> the GPU when there is one, else the CPU; cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is visible; run on the CPU")
    return torch.device(device)


def load_predictor(
    esm_model: str,
    dnabert_model: str,
    classifier: str,
    chunk_length: int | None = None,
    force_chunk_length: bool = False,
    device: str = "auto",
    batch_tokens: int | None = None,
    compile: bool | None = None,
    group_reads: int = 512,
    reuse: bool = True,
    esm_cache: ConvertedWeights | None = None,
    dnabert_cache: ConvertedWeights | None = None,
    before_compiling: Callable[[], object] | None = None,
    warm_up: bool = False,
    stop: threading.Event | None = None,
) -> Predictor:
    """Load the three models from local paths (DNABERT-S also by a hub id in the local Hugging
    Face cache).

    compile None runs the engine compiled on CUDA and eagerly on the CPU; False keeps it
    eager (slower; for debugging the compiler away), True compiles it on the CPU too.
    `group_reads` reads are scored together; reuse=False embeds repeated sequences again
    (see `Predictor`). ESM-2's weights load in one thread while DNABERT-S loads in another
    (reading files and copying to the device release the GIL), each from its
    converted-weights cache when one is given and holds it; ESM-2's encoder is built on its
    weights once both are done. `before_compiling` runs in DNABERT-S's thread before anything
    compiles (its attention check compiles FlexAttention): the worker hands torch the
    compiler's saved artifacts there, so that importing the compiler (seconds of Python)
    overlaps the weights' copy. warm_up=True compiles DNABERT-S for every batch shape in its
    thread too, once it is loaded (a small model; ESM-2's 5.6 GB are still loading):
    `Predictor.warm_up` then has only ESM-2 left. `stop` ends that early, between shapes."""
    target = resolve_device(device)
    scorer = load_classifier(classifier, target)
    length = check_chunk_length(scorer, chunk_length, force_chunk_length)

    # Two threads importing one package can trip Python's import-deadlock check (cpython
    # gh-83065), so the compiler is imported in DNABERT-S's thread only: first torch._dynamo,
    # which building a model on the meta device imports too (torch's reference kernels are
    # wrapped to disable it), while ESM-2's thread waits; then ESM-2's thread reads its
    # weights, importing nothing more, and its encoder, whose attention backend imports the
    # rest of the compiler, is built once both are done. That order also fixes the GPU
    # memory free when ESM-2 sizes its batches (batch_tokens None).
    dynamo_imported = threading.Event()

    def dnabert_after_compiler() -> DNABERTEncoder:
        try:
            importlib.import_module("torch._dynamo")
        finally:
            dynamo_imported.set()
        if before_compiling is not None:
            before_compiling()
        dnabert = load_dnabert(dnabert_model, target, batch_tokens, compile=compile, cache=dnabert_cache)
        if warm_up:
            dnabert.warm_up(stop)
        return dnabert

    def esm_weights() -> tuple[ESM2, str]:
        dynamo_imported.wait()
        return load_esm2_model(esm_model, target, esm_cache)

    with ThreadPoolExecutor(2, thread_name_prefix="load") as pool:
        esm = pool.submit(esm_weights)
        dnabert = pool.submit(dnabert_after_compiler).result()
        return Predictor(dnabert, esm2_encoder(*esm.result(), target, batch_tokens, compile=compile), scorer,
                         length, group_reads, reuse=reuse)


def check_widths(classifier_dim: int, dna_dim: int, protein_dim: int) -> None:
    if classifier_dim != dna_dim + protein_dim:
        raise ModelLoadError(
            f"the classifier expects {classifier_dim} features but DNABERT-S "
            f"({dna_dim}) + ESM-2 ({protein_dim}) give {dna_dim + protein_dim}; "
            "use the classifier trained for these encoders"
        )


def check_models(
    esm_model: str, dnabert_model: str, classifier: str, chunk_length: int | None, force_chunk_length: bool
) -> tuple[int, int]:
    """Load and cross-check the three models on the CPU before any work is planned, so that a
    model that cannot work is refused before the run is tied to it: each loads, the DNABERT-S
    tokenizer's ids fit its vocabulary, and the classifier's input width is DNA + protein
    width. The encoders' weights are checked by name and shape only, on the meta device (the
    files are memory-mapped, never copied: this runs at every start). Returns (chunk length,
    feature width)."""
    import warnings

    from core.esm2 import _checkpoint_path, model_from_checkpoint, read_checkpoint

    cpu = torch.device("cpu")
    scorer = load_classifier(classifier, cpu)
    length = check_chunk_length(scorer, chunk_length, force_chunk_length)
    with warnings.catch_warnings():  # loading into meta tensors is a no-op, as intended here
        warnings.simplefilter("ignore", UserWarning)
        dna_dim = load_dnabert(dnabert_model, torch.device("meta"), compile=False).dim
        checkpoint = read_checkpoint(_checkpoint_path(esm_model))
        protein_dim = model_from_checkpoint(checkpoint, esm_model, torch.device("meta")).embed_dim
    check_widths(scorer.input_dim, dna_dim, protein_dim)
    return length, scorer.input_dim
