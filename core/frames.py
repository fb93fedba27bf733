"""Chunking and six-frame translation, exactly as the published tool (SPEC sections 1-2).

Translation runs over a whole batch of chunks at once: the chunks are joined into one byte
string, every codon start of that string is translated in one NumPy pass (forward, and
again on its reverse complement), and each frame is then a strided slice of the result.
That is what makes tens of thousands of reads per second possible on one core; a codon
that crosses from one chunk into the next is computed but never sliced.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The chunk lengths the published classifiers were trained on (300_model.pth, 500_model.pth).
KNOWN_CHUNK_LENGTHS = (300, 500)


_CODON_TABLE = {
    "TTT": "F", "TTC": "F", "TTA": "L", "TTG": "L", "CTT": "L", "CTC": "L", "CTA": "L", "CTG": "L",
    "ATT": "I", "ATC": "I", "ATA": "I", "ATG": "M", "GTT": "V", "GTC": "V", "GTA": "V", "GTG": "V",
    "TCT": "S", "TCC": "S", "TCA": "S", "TCG": "S", "CCT": "P", "CCC": "P", "CCA": "P", "CCG": "P",
    "ACT": "T", "ACC": "T", "ACA": "T", "ACG": "T", "GCT": "A", "GCC": "A", "GCA": "A", "GCG": "A",
    "TAT": "Y", "TAC": "Y", "TAA": "*", "TAG": "*", "CAT": "H", "CAC": "H", "CAA": "Q", "CAG": "Q",
    "AAT": "N", "AAC": "N", "AAA": "K", "AAG": "K", "GAT": "D", "GAC": "D", "GAA": "E", "GAG": "E",
    "TGT": "C", "TGC": "C", "TGA": "*", "TGG": "W", "CGT": "R", "CGC": "R", "CGA": "R", "CGG": "R",
    "AGT": "S", "AGC": "S", "AGA": "R", "AGG": "R", "GGT": "G", "GGC": "G", "GGA": "G", "GGG": "G",
}
_SKIPPED = ord("-")  # a codon with a letter outside ACGT: adds no residue
_SKIPPED_BYTE = bytes([_SKIPPED])


def _base5_tables() -> tuple[bytes, np.ndarray]:
    """Byte -> base code (A0 C1 G2 T3, anything else 4) and 125 codon codes -> residue byte."""
    to_code = bytearray([4] * 256)
    for code, base in enumerate(b"ACGT"):
        to_code[base] = code
    residues = np.full(125, _SKIPPED, dtype=np.uint8)
    for codon, residue in _CODON_TABLE.items():
        a, b, c = ("ACGT".index(x) for x in codon)
        residues[a * 25 + b * 5 + c] = ord(residue)
    return bytes(to_code), residues


_TO_CODE, _RESIDUES = _base5_tables()
_COMPLEMENT = bytes.maketrans(b"ACGT", b"TGCA")  # other letters pass through unchanged


@dataclass(frozen=True)
class Chunk:
    id: str  # {record_id}_chunk_{i+1}
    sequence: str  # case preserved


@dataclass(frozen=True)
class Frame:
    id: str  # {chunk_id}F{k} or {chunk_id}R{k}
    chunk_id: str
    nucleotide: str  # the published slice: one base longer than the codons when it exists
    protein: str


def chunk_spans(length: int, chunk_length: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a record: overlap spread over the chunks (SPEC 1)."""
    n = math.ceil(length / chunk_length)
    spread = n * chunk_length - length
    low = spread // n if n else 0
    need = spread - low * (n - 1)
    steps = ([low + 1] * need + [low] * (n - 1 - need) + [0])[:n]
    spans, shift = [], 0
    for i in range(n):
        start = i * chunk_length - shift
        spans.append((start, min(start + chunk_length, length)))
        shift += steps[i]
    return spans


def chunk_record(record_id: str, sequence: str, chunk_length: int) -> list[Chunk]:
    """The chunks of one record, ids numbered from 1."""
    return [
        Chunk(f"{record_id}_chunk_{i}", sequence[start:end])
        for i, (start, end) in enumerate(chunk_spans(len(sequence), chunk_length), start=1)
    ]


def open_frames(chunks: Sequence[Chunk]) -> list[list[Frame]]:
    """The kept frames of each chunk, in the order F1 F2 F3 R1 R2 R3 (SPEC 2).

    A frame is kept when its protein is non-empty and holds no stop codon.
    """
    if not chunks:
        return []
    forward = "".join(chunk.sequence for chunk in chunks).upper().encode("ascii", "replace")
    reverse = forward.translate(_COMPLEMENT)[::-1]
    forward_residues, reverse_residues = _translate_all(forward), _translate_all(reverse)
    total = len(forward)
    kept: list[list[Frame]] = []
    start = 0
    for chunk in chunks:
        end = start + len(chunk.sequence)
        frames: list[Frame] = []
        for strand, bases, residues, lo, hi in (
            ("F", forward, forward_residues, start, end),
            ("R", reverse, reverse_residues, total - end, total - start),
        ):
            for offset in range(3):
                # Codons that start at lo + offset .. hi - 3. For a chunk of under 3 bases at
                # the batch's start, hi - 2 is negative: clamp it, or the slice would wrap
                # round to the other chunks' residues.
                protein = residues[lo + offset : max(hi - 2, 0) : 3]
                if b"*" in protein:
                    continue
                if _SKIPPED_BYTE in protein:
                    protein = protein.replace(_SKIPPED_BYTE, b"")
                if not protein:
                    continue
                nucleotide = bases[lo + offset : min(lo + offset + 1 + 3 * len(protein), hi)]
                frames.append(
                    Frame(
                        f"{chunk.id}{strand}{offset + 1}",
                        chunk.id,
                        nucleotide.decode("ascii"),
                        protein.decode("ascii"),
                    )
                )
        kept.append(frames)
        start = end
    return kept



def _translate_all(bases: bytes) -> bytes:
    """Residue (or the skip marker) of the codon starting at every position of `bases`."""
    if len(bases) < 3:
        return b""
    codes = np.frombuffer(bases.translate(_TO_CODE), dtype=np.uint8)
    codons = codes[:-2] * 25 + codes[1:-1] * 5 + codes[2:]
    return _RESIDUES[codons].tobytes()
