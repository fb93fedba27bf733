"""Chunking and frame selection: the reference files byte for byte, and an independent
straightforward implementation of SPEC sections 1-2 on generated edge cases."""
from __future__ import annotations

import math
import random

import pytest

from core.frames import chunk_record, chunk_spans, open_frames
from job.cli import main

CODONS = {
    a + b + c: aa
    for (a, b, c), aa in zip(
        ((x, y, z) for x in "TCAG" for y in "TCAG" for z in "TCAG"),
        "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    )
}


def naive_chunks(seq: str, c: int) -> list[str]:
    n = math.ceil(len(seq) / c)
    r = n * c - len(seq)
    lo = r // n if n else 0
    need = r - lo * (n - 1)
    steps = ([lo + 1] * need + [lo] * (n - 1 - need) + [0])[:n]
    return [seq[i * c - sum(steps[:i]) : i * c - sum(steps[:i]) + c] for i in range(n)]


def naive_frames(chunk_id: str, chunk: str) -> list[tuple[str, str, str]]:
    up = chunk.upper()
    comp = {"A": "T", "T": "A", "C": "G", "G": "C"}
    rc = "".join(comp.get(b, b) for b in reversed(up))
    out = []
    for strand, s in (("F", up), ("R", rc)):
        for k in (1, 2, 3):
            protein = "".join(CODONS.get(s[p : p + 3], "") for p in range(k - 1, len(s) - 2, 3))
            if protein and "*" not in protein:
                out.append((f"{chunk_id}{strand}{k}", s[k - 1 : k + 3 * len(protein)], protein))
    return out


def test_spec_examples() -> None:
    assert chunk_spans(501, 500) == [(0, 500), (250, 501)]
    assert chunk_spans(1200, 500) == [(0, 500), (399, 899), (798, 1200)]
    assert chunk_spans(500, 500) == [(0, 500)]
    assert chunk_spans(7, 300) == [(0, 7)]


@pytest.mark.parametrize("c", [300, 500])
def test_every_length_matches_naive(c: int) -> None:
    rng = random.Random(c)
    alphabet = "ACGTacgtNRYKMSWBDHVn"
    for length in range(1, 2001):
        # mostly ACGT with a sprinkling of lowercase, N and IUPAC codes
        seq = "".join(rng.choice("ACGT") if rng.random() < 0.97 else rng.choice(alphabet) for _ in range(length))
        chunks = chunk_record("r", seq, c)
        assert [ch.sequence for ch in chunks] == naive_chunks(seq, c), length
        assert chunks[-1].sequence == seq[-len(chunks[-1].sequence):]
        assert all(len(ch.sequence) == c for ch in chunks[:-1])
        got = [(f.id, f.nucleotide, f.protein) for kept in open_frames(chunks) for f in kept]
        want = [t for ch in chunks for t in naive_frames(ch.id, ch.sequence)]
        assert got == want, length


def test_a_batch_of_many_reads_gives_each_chunk_its_own_frames() -> None:
    # The frames are cut from one translation of the whole batch: a chunk of 1-2 bases at
    # either end must not pick up its neighbours' residues (a 1-base read first in a batch
    # once took every forward frame of the reads after it).
    rng = random.Random(7)
    for trial in range(300):
        lengths = [rng.choice([1, 2, 3, 4, 5, 6, 7, 20, 301, 650]) for _ in range(rng.randint(1, 6))]
        chunks = [
            chunk
            for n, length in enumerate(lengths)
            for chunk in chunk_record(f"r{n}", "".join(rng.choice("ACGT") for _ in range(length)), 300)
        ]
        got = [(f.id, f.nucleotide, f.protein) for kept in open_frames(chunks) for f in kept]
        want = [t for ch in chunks for t in naive_frames(ch.id, ch.sequence)]
        assert got == want, lengths
    assert open_frames(chunk_record("a", "A", 300) + chunk_record("b", "ATGAAACCCGGGTTTATG", 300))[0] == []


def test_open_forward_and_reverse_frames_and_skipped_codons() -> None:
    # stop-free in all frames but F1 carries an N codon and R frames exist too
    seq = "ATGGCNGCTGCAaaaGGG"
    got = [(f.id, f.nucleotide, f.protein) for kept in open_frames(chunk_record("x", seq, 300)) for f in kept]
    assert got == naive_frames("x_chunk_1", seq)
    ids = [g[0] for g in got]
    assert "x_chunk_1F1" in ids and any(i[-2] == "R" for i in ids)
    assert dict((g[0], g[2]) for g in got)["x_chunk_1F1"] == "MAAKG"  # GCN skipped, no X


@pytest.mark.parametrize("name", ["test_with_orfs", "test_fixed_500bp", "test_sequences_small"])
def test_translate_reproduces_reference_bytes(name: str, reference, tmp_path) -> None:
    assert main(["translate", "--input", str(reference / f"{name}.fa"), "--chunk-length", "500",
                 "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "chunked.fa").read_bytes() == (reference / f"{name}_chunked500.fa").read_bytes()
    for ours, theirs in (("identified_nucleotide.fa", "identified_nucleotide.fa"),
                         ("identified_protein.faa", "identified_protein.faa")):
        published = reference / f"{name}_{theirs}"
        expected = published.read_bytes() if published.exists() else b""  # no open frame: nothing
        assert (tmp_path / ours).read_bytes() == expected
