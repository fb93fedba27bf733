"""STAND-IN until the reader branch lands (core/scan.py is theirs): FASTA header scanner."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.fasta import FastaError


@dataclass(frozen=True)
class Scanned:
    offsets: np.ndarray
    lines: np.ndarray
    ids: list[bytes]


class RecordScanner:
    def __init__(self, name: str) -> None:
        self.name = name
        self._pending = b""
        self._base = 0  # stream offset of _pending[0]
        self._line = 1  # line number of _pending[0]

    def feed(self, block: bytes) -> Scanned:
        data = self._pending + block
        cut = data.rfind(b"\n") + 1
        return self._scan(data, cut)

    def close(self) -> Scanned:
        return self._scan(self._pending, len(self._pending))

    def _scan(self, data: bytes, cut: int) -> Scanned:
        offsets, lines, ids = [], [], []
        position, line = 0, self._line
        while position < cut:
            nl = data.find(b"\n", position, cut)
            end = cut if nl < 0 else nl + 1
            text = data[position:end].strip()
            if text.startswith(b">"):
                fields = text[1:].split(None, 1)
                if not fields:
                    raise FastaError(self.name, line, "a '>' header with no id after it", "Give every record an id.")
                offsets.append(self._base + position)
                lines.append(line)
                ids.append(fields[0])
            elif text and not offsets and self._base + position == 0 and line == 1:
                raise FastaError(self.name, line, "sequence data before the first '>' header", "Is this FASTA?")
            position, line = end, line + 1
        self._pending = data[cut:]
        self._base += cut
        self._line = line
        return Scanned(np.array(offsets, np.int64), np.array(lines, np.int64), ids)
