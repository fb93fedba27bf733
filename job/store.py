"""Where a run keeps its state and results: an S3 prefix or a local directory.

Everything the batch job shares between processes and machines goes through `Store`, and
its two operations that decide races are conditional writes:

- `create` succeeds for exactly one writer of a key (S3 If-None-Match: "*"; locally a hard
  link, which fails when the name exists);
- `replace` succeeds only while the object still has the ETag the writer read (S3 If-Match;
  locally a hard link that names the successor of that version, see `LocalStore`).

A conditional write can be retried after its response was lost (a 5xx after the object was
stored): the retry then finds the object already there. Callers therefore write bodies that
are unique (they carry a nonce), and a refused write whose stored body is byte-identical to
ours is recognised as our own and reported as a success.

Every write is atomic: readers see the old object or the new one, never a partial one.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import ClientError

from job import s3

PART_SIZE = 64 * 2**20  # S3 multipart part size for large uploads (final outputs)
STREAM_PART_SIZE = 16 * 2**20  # parts of an output streamed while it is written (S3's minimum: 5 MiB)
STREAM_PARTS_AHEAD = 2  # parts of a streamed output held while earlier ones upload (bounds memory)


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag a conditional `replace` must name."""

    data: bytes
    etag: str


class Writer(Protocol):
    """An object written piece by piece; it appears, whole and at once, only at `commit`."""

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Store(Protocol):
    uri: str

    def get(self, key: str) -> Versioned | None: ...
    def create(self, key: str, data: bytes) -> str | None: ...
    def replace(self, key: str, data: bytes, etag: str) -> str | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def upload(self, key: str, path: str) -> None: ...
    def writer(self, key: str) -> Writer: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """The store for an output URI: `s3://bucket/prefix` or a local directory."""
    if s3.is_s3(uri):
        return S3Store(uri, endpoint_url)
    return LocalStore(uri)


class S3Store:
    """A prefix in a bucket, through one boto3 client (conditional writes, multipart uploads)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, part_size: int = PART_SIZE) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, prefix = s3.split_uri(self.uri)
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        self._client = s3.client(endpoint_url)

    def get(self, key: str) -> Versioned | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return Versioned(response["Body"].read(), response["ETag"])

    def create(self, key: str, data: bytes) -> str | None:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        return self._conditional_put(key, data, IfMatch=etag)

    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def upload(self, key: str, path: str) -> None:
        """A multipart upload from one part on (one PUT below); the object appears only when complete.

        The store's own client, not s3fs: an s3fs session costs the merge ~0.35 CPU seconds to
        start (it loads botocore's S3 model again), in the final seconds of the merge."""
        writer = _MultipartWriter(self._client, self.bucket, self.prefix + key, self.part_size, parts_ahead=1)
        try:
            with open(path, "rb") as handle:
                while block := handle.read(self.part_size):
                    writer.write(block)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def writer(self, key: str) -> Writer:
        """Streamed to S3 while it is written: a multipart upload, completed at `commit`."""
        return _MultipartWriter(self._client, self.bucket, self.prefix + key, STREAM_PART_SIZE)

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the keys; one that S3 refuses raises OSError, as a local file would (S3 answers
        a batch delete with 200 and lists the refused keys in the body)."""
        batch = [{"Key": self.prefix + key} for key in keys]
        for start in range(0, len(batch), 1000):
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch[start:start + 1000], "Quiet": True}
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise OSError(
                    f"cannot delete s3://{self.bucket}/{first.get('Key')} ({first.get('Code')}: "
                    f"{first.get('Message')}){f' and {len(errors) - 1} more' if len(errors) > 1 else ''}"
                )

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> str | None:
        for attempt in range(8):
            try:
                response = self._client.put_object(
                    Bucket=self.bucket, Key=self.prefix + key, Body=data, **condition
                )
                return response["ETag"]
            except ClientError as exc:
                code = _code(exc)
                if code == "ConditionalRequestConflict":  # a concurrent conditional write: retry
                    time.sleep(min(0.05 * 2**attempt, 2.0))
                    continue
                if code in ("PreconditionFailed", "NoSuchKey", "412", "404"):
                    return _ours(self.get(key), data)
                raise
        raise RuntimeError(f"{self.uri}/{key}: conditional write kept conflicting")


class LocalStore:
    """A directory on one machine's filesystem, with the same atomicity as S3, and no locks.

    `create` hard-links a complete temporary file to the key's name: it fails when the name
    exists. `replace` hard-links the new version as the successor of the version it
    replaces, `.<name>.next/<etag>`: each version can have one successor only, so of several
    writers of one version exactly one wins, without any lock that a stopped process (SIGSTOP,
    a laptop's suspend) could hold forever. The winner then renames a copy over the key's own
    file, for people and tools that read it; `get` follows successors from that file, so a
    writer stopped between its link and its rename delays nobody. Successors are kept until
    the key is deleted (a stale rename could otherwise bring an old version back).
    """

    def __init__(self, uri: str) -> None:
        self.root = Path(uri).expanduser().absolute()
        self.uri = str(self.root)

    def get(self, key: str) -> Versioned | None:
        path = self.root / key
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # no such object
            return None
        etag = _etag(data)
        while True:  # the file may lag behind the versions `replace` linked after it
            try:
                data = (_successors(path) / etag.strip('"')).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return Versioned(data, etag)
            etag = _etag(data)

    def create(self, key: str, data: bytes) -> str | None:
        path = self.root / key
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # fails when the name exists: the local If-None-Match
        except FileExistsError:
            return _ours(self.get(key), data)
        finally:
            tmp.unlink()
        return _etag(data)

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        path = self.root / key
        current = self.get(key)
        if current is None or current.etag != etag:
            return _ours(current, data)
        tmp = self._write_temp(path, data)
        try:
            _successors(path).mkdir(exist_ok=True)
            os.link(tmp, _successors(path) / etag.strip('"'))  # the compare-and-swap
        except FileExistsError:
            tmp.unlink()
            return _ours(self.get(key), data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.replace(tmp, path)
        except OSError:  # the version is stored (linked); readers follow the link to it
            tmp.unlink(missing_ok=True)
        return _etag(data)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        os.replace(self._write_temp(path, data), path)

    def upload(self, key: str, path: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial copy behind
            raise

    def writer(self, key: str) -> Writer:
        return _LocalWriter(self, key)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        directory = base if prefix.endswith("/") or base.is_dir() else base.parent
        if not directory.is_dir():
            return []
        keys = []
        for path in directory.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not _is_internal(path.relative_to(self.root)):
                keys.append(key)
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            shutil.rmtree(_successors(path), ignore_errors=True)

    @staticmethod
    def _write_temp(path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
        return tmp


class _MultipartWriter:
    """One S3 object written in parts while it is produced: each `part_size` bytes go up in a
    background thread (at most `parts_ahead` waiting), so the upload overlaps the work that
    produces the object. Nothing is visible before `commit` completes the upload; an object
    smaller than one part is one plain PUT at `commit`; `abort` discards the parts."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int, parts_ahead: int = STREAM_PARTS_AHEAD) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._part_size, self._parts_ahead = part_size, parts_ahead
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="part-upload")
        self._parts: list[Future] = []

    def write(self, data: bytes) -> None:
        if not self._buffer and len(data) == self._part_size:  # a whole part (a file's block): no copy
            self._send(bytes(data))
            return
        self._buffer += data
        if len(self._buffer) >= self._part_size:
            self._send(bytes(self._buffer))
            self._buffer.clear()

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._upload_part, number, body))
        if len(self._parts) > self._parts_ahead:
            self._parts[-1 - self._parts_ahead].result()  # wait: memory holds a few parts at most

    def _upload_part(self, number: int, body: bytes) -> dict[str, object]:
        response = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def commit(self) -> None:
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._send(bytes(self._buffer))
            parts = [part.result() for part in self._parts]
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        self._pool.shutdown()
        self._buffer.clear()

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        if self._upload_id is not None:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            self._upload_id = None


class _LocalWriter:
    """A local temporary file (outside the output directory, so a killed writer leaves nothing
    there), handed to `LocalStore.upload` at `commit`: the key appears whole, at once."""

    def __init__(self, store: LocalStore, key: str) -> None:
        self._store, self._key = store, key
        self._file = tempfile.NamedTemporaryFile(prefix="virnucpro-output-", delete=False)

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except BaseException:
            self.abort()  # a full disk leaves no partial file behind
            raise

    def commit(self) -> None:
        try:
            self._file.close()
            self._store.upload(self._key, self._file.name)
        finally:
            self.abort()

    def abort(self) -> None:
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)


def _successors(path: Path) -> Path:
    """Where `LocalStore.replace` links the successor of each version of `path`."""
    return path.with_name(f".{path.name}.next")


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _ours(current: Versioned | None, data: bytes) -> str | None:
    """The stored ETag when the stored body is the one we tried to write, else None."""
    return current.etag if current is not None and current.data == data else None


def _is_internal(relative: Path) -> bool:
    """Temporary files and successor links: never keys of their own."""
    return relative.name.endswith(".tmp") or any(part.endswith(".next") for part in relative.parts[:-1])


def _code(exc: ClientError) -> str:
    error: dict[str, Any] = exc.response.get("Error", {})
    return str(error.get("Code", ""))
