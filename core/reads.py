"""STAND-IN until the reader branch lands (core/reads.py is theirs): FASTA via core.fasta."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import BinaryIO

from core.fasta import FastaError as ReadsError
from core.fasta import Record, read_fasta

__all__ = ["ReadsError", "Record", "read_records"]


def read_records(stream: BinaryIO, name: str, first_line: int = 1) -> Iterator[Record]:
    for record in read_fasta(stream, name):
        yield replace(record, line=record.line + first_line - 1)
