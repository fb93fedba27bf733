"""Input FASTA objects: URIs expanded to files, fingerprinted, and streamed as records.

A URI is a local file or directory, or an S3 object or prefix. A directory or prefix stands
for the FASTA files under it (by name: .fa, .fasta, .fna, .ffn, .fas, .seq, each optionally
.gz), in sorted order, so the same arguments always give the same reads in the same order.
A fingerprint (size and S3 ETag or local mtime) tells a resumed run whether an input
changed under it.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.reads import Record, read_records as read_fasta
from job import s3
from job.errors import BadInput

GZIP_MAGIC = b"\x1f\x8b"
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas", ".seq")
READ_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class InputObject:
    """One input file as the plan records it."""

    uri: str
    size: int
    version: str  # S3 ETag, or the local modification time in ns

    def fingerprint(self) -> dict[str, object]:
        return {"uri": self.uri, "size": self.size, "version": self.version}


def resolve_inputs(uris: tuple[str, ...], endpoint_url: str | None) -> list[InputObject]:
    """Every input file named by `uris`, in argument order then sorted name order."""
    fs = s3.filesystem(endpoint_url) if any(s3.is_s3(uri) for uri in uris) else None
    objects: list[InputObject] = []
    for uri in uris:
        found = _s3_objects(fs, uri) if s3.is_s3(uri) else _local_objects(uri)
        if not found:
            raise BadInput(
                f"input {uri} holds no FASTA files (names ending in {', '.join(FASTA_SUFFIXES)}, "
                "optionally .gz); name the files themselves or check the prefix"
            )
        objects.extend(found)
    return objects


def stat_input(obj: InputObject, endpoint_url: str | None) -> InputObject:
    """The input as it is now (to compare with the plan's fingerprint)."""
    if s3.is_s3(obj.uri):
        return _s3_objects(s3.filesystem(endpoint_url), obj.uri)[0]
    return _local_objects(obj.uri)[0]


def read_records(obj: InputObject, endpoint_url: str | None, offset: int = 0) -> Iterator[Record]:
    """The records of one input, streamed (plain or gzip); a plain-text input can start at
    `offset`, the byte offset of a header line (from `indexed_records`)."""
    with _open(obj.uri, endpoint_url) as stream:
        if offset:
            stream.seek(offset)
        yield from read_fasta(stream, obj.uri)


def indexed_records(obj: InputObject, endpoint_url: str | None) -> Iterator[tuple[Record, int | None]]:
    """The records of one input, each with the byte offset of its header line, so that a
    worker can seek straight to its shard; None for gzip input, which cannot seek."""
    with _open(obj.uri, endpoint_url) as raw:
        stream = io.BufferedReader(raw, READ_BLOCK) if not hasattr(raw, "peek") else raw  # type: ignore[arg-type]
        if stream.peek(2)[:2] == GZIP_MAGIC:
            for record in read_fasta(stream, obj.uri):
                yield record, None
            return
        lines = _HeaderOffsets(stream)
        for record in read_fasta(lines, obj.uri):  # type: ignore[arg-type]
            yield record, lines.offsets.pop(record.line, None)  # None: read from the start


class _HeaderOffsets:
    """Lines of a plain-text stream; remembers where each header line starts until its
    record has been read."""

    def __init__(self, stream: io.BufferedReader) -> None:
        self._stream = stream
        self.offsets: dict[int, int] = {}  # line number -> byte offset
        self._lines = self._numbered()

    def peek(self, size: int = 0) -> bytes:
        return self._stream.peek(size)

    def read(self, size: int = -1) -> bytes:
        """Whole lines, about `size` bytes of them (the reader reads blocks)."""
        chunk, total = [], 0
        for line in self._lines:
            chunk.append(line)
            total += len(line)
            if total >= size > 0:
                break
        return b"".join(chunk)

    def _numbered(self) -> Iterator[bytes]:
        offset = 0
        numbered = True  # until a lone CR (a line break the reader counts, this loop not)
        for number, line in enumerate(self._stream, start=1):
            numbered = numbered and b"\r" not in line.removesuffix(b"\r\n")
            if numbered and line.lstrip().startswith(b">"):
                self.offsets[number] = offset
            offset += len(line)
            yield line


def _open(uri: str, endpoint_url: str | None) -> BinaryIO:
    if s3.is_s3(uri):
        return s3.filesystem(endpoint_url).open(uri, "rb", block_size=READ_BLOCK, cache_type="readahead")
    return open(uri, "rb")


def _is_fasta(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(FASTA_SUFFIXES)


def _local_objects(uri: str) -> list[InputObject]:
    path = Path(uri).expanduser().absolute()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_fasta(p.name))
    elif path.is_file():
        files = [path]
    else:
        raise BadInput(f"input {uri} does not exist; check the path")
    objects = []
    for file in files:
        stat = file.stat()
        objects.append(InputObject(str(file), stat.st_size, str(stat.st_mtime_ns)))
    return objects


def _s3_objects(fs, uri: str) -> list[InputObject]:  # noqa: ANN001 (s3fs.S3FileSystem)
    path = uri.removeprefix("s3://").rstrip("/")
    try:
        if fs.isfile(path):
            infos = [fs.info(path)]
        elif fs.isdir(path):
            infos = [fs.info(p) for p in sorted(fs.find(path)) if _is_fasta(p)]
        else:
            infos = None
    except PermissionError as exc:
        raise BadInput(f"input {uri} cannot be read ({exc}); check the credentials and bucket policy") from None
    if infos is None:
        raise BadInput(f"input {uri} does not exist; check the bucket, the key and --s3-endpoint-url")
    return [InputObject(f"s3://{info['name']}", int(info["size"]), str(info.get("ETag", ""))) for info in infos]

