"""Input read files: URIs expanded to files, fingerprinted, and opened at a byte range.

A URI is a local file or directory, or an S3 object or prefix. A directory or prefix stands
for the read files under it (by name: FASTA .fa, .fasta, .fna, .ffn, .fas, .seq and FASTQ
.fastq, .fq, each optionally .gz), in sorted order, so the same arguments always give the
same reads in the same order; the format itself is told by content (core/reads.py). Two
kinds of file under a directory are passed over, and logged (`inputs_skipped`): hidden ones
(a name starting with a dot: macOS's `._x.fa` copies, editors' files) and those inside a
VirNucPro output (a directory holding `_run/plan.json`), such as an --output kept under the
input directory, whose viral_reads.fa.gz would otherwise become an input of the next run.
A folder of the user's that happens to be called `_run` holds no plan and is read.

A fingerprint tells a resumed run whether an input changed under it: size plus, for S3,
the ETag, and for a local file its modification time, change time and inode (an edit that
keeps the size and restores the mtime still changes the ctime; a replaced file has a new
inode). Every read of an S3 input names the planned ETag (GET If-Match), so a machine
already working never reads an object overwritten since the plan: S3 answers 412 and the
run stops with the changed-input error (exit 65).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from job import s3
from job.errors import BadInput
from job.log import get_logger

READ_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas", ".seq", ".fastq", ".fq")
RUN_MARK = ("_run", "plan.json")  # what makes a directory a VirNucPro output: job/plan.py's PLAN_KEY
READ_BLOCK = 8 * 2**20
STREAM_RETRIES = 5  # re-GETs of an S3 input's rest after its stream broke


@dataclass(frozen=True)
class InputObject:
    """One input file as the plan records it."""

    uri: str
    size: int
    version: str  # S3 ETag, or local "mtime_ns:ctime_ns:inode"

    def fingerprint(self) -> dict[str, object]:
        return {"uri": self.uri, "size": self.size, "version": self.version}


class InputChanged(BadInput):
    """An input is no longer the object the run planned (exit 65)."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"input {uri} changed while the run was using it (it no longer has the planned "
            "version); restore it, or start a new run with another --output"
        )


def resolve_inputs(uris: tuple[str, ...], endpoint_url: str | None) -> list[InputObject]:
    """Every input file named by `uris`, in argument order then sorted name order."""
    fs = s3.filesystem(endpoint_url) if any(s3.is_s3(uri) for uri in uris) else None
    objects: list[InputObject] = []
    named: dict[str, str] = {}  # file -> the argument that named it
    for uri in uris:
        found = _s3_objects(fs, uri) if s3.is_s3(uri) else _local_objects(uri)
        if not found:
            raise BadInput(
                f"input {uri} holds no read files (names ending in {', '.join(READ_SUFFIXES)}, "
                "optionally .gz); name the files themselves or check the prefix"
            )
        for obj in found:
            if any(mark in obj.uri for mark in "\t\n\r"):
                raise BadInput(
                    f"input {obj.uri!r} has a tab or a line break in its name, which the TSV outputs "
                    "cannot hold; rename the file"
                )
            if obj.uri in named:
                raise BadInput(
                    f"input {obj.uri} is named twice (by {named[obj.uri]} and by {uri}); name each file "
                    "once, or its reads would be scored twice"
                )
            named[obj.uri] = uri
        objects.extend(found)
    return objects


# A file of a pair by its name: <head><1|2><rest>, the rest only an optional lane-style
# number and extensions (_001.fastq.gz, .fq), the head ending in a separator, R, or both
# (sample_R1_001.fastq.gz, SRR1_1.fastq, reads.1.fa, R1.fq.gz).
_MATE_REST = re.compile(r"(?:_\d+)?(?:\.[A-Za-z]+)+")
_MATE_HEAD = re.compile(r"(?:.*[._-])?R?")


def pair_mates(objects: list[InputObject]) -> tuple[int, ...]:
    """Per input, 1 or 2 when it is a file of a pair told by its name whose other file is an
    input too (same folder or prefix, the name with the other mate number), else 0.

    Reads of such a file whose header gives no mate take it from the file (core.reads.
    with_mate): without it, the two files of an SRA dump share every id and R2 would be
    all duplicates."""
    uris = {obj.uri for obj in objects}
    return tuple(_mate_by_name(obj.uri, uris) for obj in objects)


def _mate_by_name(uri: str, uris: set[str]) -> int:
    folder, _, name = uri.rpartition("/")
    for at, char in enumerate(name):
        if char in "12" and _MATE_HEAD.fullmatch(name[:at]) and _MATE_REST.fullmatch(name[at + 1:]):
            if f"{folder}/{name[:at]}{3 - int(char)}{name[at + 1:]}" in uris:
                return int(char)
    return 0


def stat_input(obj: InputObject, endpoint_url: str | None) -> InputObject:
    """The input as it is now (to compare with the plan's fingerprint)."""
    if s3.is_s3(obj.uri):
        return _s3_objects(s3.filesystem(endpoint_url), obj.uri)[0]
    return _local_objects(obj.uri)[0]


def open_input(obj: InputObject, endpoint_url: str | None, start: int = 0, end: int | None = None) -> BinaryIO:
    """The input's raw bytes `start` .. `end` (exclusive; None: to the end), as planned.

    A local file that no longer matches its fingerprint, or an S3 object whose ETag is not
    the planned one, raises `InputChanged`.
    """
    if s3.is_s3(obj.uri):
        if end is not None and end <= start:
            return io.BytesIO(b"")
        return io.BufferedReader(_PinnedObject(obj, s3.client(endpoint_url), start, end), READ_BLOCK)
    if _local_objects(obj.uri)[0] != obj:
        raise InputChanged(obj.uri)
    handle = open(obj.uri, "rb")
    handle.seek(start)
    if end is None:
        return handle
    with handle:
        return io.BytesIO(handle.read(end - start))


class _PinnedObject(io.RawIOBase):
    """Bytes `start` .. `end` of an S3 object at its planned ETag, as a raw stream.

    One GET (If-Match, Range) streams them; should the stream break (a reset connection, a
    read timeout: a plan pass reads gigabytes through one GET), the rest is asked for again
    from where it stopped, still pinned to the ETag, up to STREAM_RETRIES times.
    """

    def __init__(self, obj: InputObject, client, start: int, end: int | None) -> None:  # noqa: ANN001 (boto3 client)
        self.obj, self.client, self.position, self.end = obj, client, start, end
        self.bucket, self.key = s3.split_uri(obj.uri)
        self._body = self._get()

    def _get(self):  # noqa: ANN202 (botocore StreamingBody)
        request = {"Bucket": self.bucket, "Key": self.key, "IfMatch": self.obj.version}
        if self.position or self.end is not None:
            request["Range"] = f"bytes={self.position}-{'' if self.end is None else self.end - 1}"
        try:
            return self.client.get_object(**request)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey"):
                raise InputChanged(self.obj.uri) from None
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        for attempt in range(STREAM_RETRIES + 1):
            try:
                data = self._body.read(len(buffer))
                break
            except (BotoCoreError, OSError):
                if attempt == STREAM_RETRIES:
                    raise
                self._body.close()
                self._body = self._get()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _is_reads(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(READ_SUFFIXES)


def _reads_under(uri: str, names: list[str]) -> list[str]:
    """The read files among a directory's or prefix's files (`names`: '/'-separated, relative
    to it), passing over hidden files and VirNucPro outputs (module docstring), logged; a
    directory whose every read file was passed over is an error that says so."""
    parts = [name.split("/") for name in names]
    mark = len(RUN_MARK)
    outputs = {tuple(p[:-mark]) for p in parts if tuple(p[-mark:]) == RUN_MARK}
    kept, hidden, in_outputs = [], 0, 0
    for name, p in zip(names, parts):
        if not _is_reads(p[-1]):
            continue
        if any(tuple(p[:depth]) in outputs for depth in range(len(p))):
            in_outputs += 1
        elif any(part.startswith(".") for part in p):
            hidden += 1
        else:
            kept.append(name)
    roots = sorted("/".join((uri.rstrip("/"), *root)) for root in outputs)
    if hidden or in_outputs:
        log = get_logger().warning if in_outputs else get_logger().info
        log("inputs_skipped", input=uri, hidden_files=hidden, files_in_outputs=in_outputs, outputs=roots)
    if not kept and (hidden or in_outputs):
        raise BadInput(
            f"input {uri} holds no read files but hidden ones ({hidden}) and those inside VirNucPro "
            f"outputs ({in_outputs}: {', '.join(roots) or 'none'}), which are not read; name the "
            "files to read one by one"
        )
    return kept


def _local_objects(uri: str) -> list[InputObject]:
    path = Path(uri).expanduser().absolute()
    if path.is_dir():
        # folder by folder, as sorting the paths did before: 'S1/x.fq' before 'S1-rep/x.fq'
        names = sorted((p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()),
                       key=lambda name: name.split("/"))
        files = [path / name for name in _reads_under(uri, names)]
        for file in files:
            if not file.is_file():
                raise BadInput(
                    f"input {file} (under {uri}) is not a readable file (a broken link?); fix or "
                    "remove it, or name the files to read one by one"
                )
    elif path.is_file():
        files = [path]
    else:
        raise BadInput(f"input {uri} does not exist; check the path")
    objects = []
    for file in files:
        stat = file.stat()
        objects.append(InputObject(str(file), stat.st_size, f"{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"))
    return objects


def _s3_objects(fs, uri: str) -> list[InputObject]:  # noqa: ANN001 (s3fs.S3FileSystem)
    path = uri.removeprefix("s3://").rstrip("/")
    try:
        if fs.isfile(path):
            infos = [fs.info(path)]
        elif fs.isdir(path):
            names = [p.removeprefix(f"{path}/") for p in sorted(fs.find(path))]
            infos = [fs.info(f"{path}/{name}") for name in _reads_under(uri, names)]
        else:
            infos = None
    except PermissionError as exc:
        raise BadInput(f"input {uri} cannot be read ({exc}); check the credentials and bucket policy") from None
    if infos is None:
        raise BadInput(f"input {uri} does not exist; check the bucket, the key and --s3-endpoint-url")
    return [InputObject(f"s3://{info['name']}", int(info["size"]), str(info.get("ETag", ""))) for info in infos]

