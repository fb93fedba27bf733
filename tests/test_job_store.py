"""Store: conditional writes decide races the same way on S3 (moto) and on a local directory."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import pytest

from job.store import LocalStore, S3Store, Store, open_store
from job_support import bucket, s3_endpoint  # noqa: F401 (fixtures)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:  # noqa: ANN001
    if request.param == "local":
        return LocalStore(str(tmp_path / "out"))
    name = request.getfixturevalue("bucket")
    return open_store(f"s3://{name}/runs/one")


def test_create_is_once_only(store: Store) -> None:
    etag = store.create("a/k.json", b"first")
    assert etag is not None
    assert store.create("a/k.json", b"second") is None
    assert store.get("a/k.json").data == b"first"
    assert store.create("a/k.json", b"first") == etag  # our own write, retried: recognised


def test_replace_needs_the_current_etag(store: Store) -> None:
    etag = store.create("k", b"v1")
    new = store.replace("k", b"v2", etag)
    assert new is not None and new != etag
    assert store.replace("k", b"v3", etag) is None  # stale etag
    assert store.get("k") .data == b"v2"
    assert store.replace("missing", b"x", etag) is None


def test_put_list_delete(store: Store) -> None:
    store.put("p/a/1", b"1")
    store.put("p/a/2", b"2")
    store.put("p/b", b"3")
    store.put("q", b"4")
    assert store.list("p/") == ["p/a/1", "p/a/2", "p/b"]
    assert store.list("p/a/") == ["p/a/1", "p/a/2"]
    store.delete(["p/a/1", "p/b"])
    assert store.list("p/") == ["p/a/2"]
    assert store.get("p/a/1") is None


def test_racing_writers_have_one_winner(store: Store) -> None:
    etag = store.create("race", b"start")
    results: dict[str, list] = {"create": [], "replace": []}
    barrier = threading.Barrier(8)

    def contend(n: int) -> None:
        barrier.wait()
        results["create"].append(store.create("new", f"writer {n}".encode()))
        results["replace"].append(store.replace("race", f"writer {n}".encode(), etag))

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results["create"]) == 1
    assert sum(r is not None for r in results["replace"]) == 1


def test_a_delete_s3_refuses_raises_like_a_local_one(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = S3Store(f"s3://{bucket}/runs/one")
    store.put("_FAILED", b"{}")
    refused = {"Errors": [{"Key": "runs/one/_FAILED", "Code": "AccessDenied", "Message": "Access Denied"}]}
    monkeypatch.setattr(store._client, "delete_objects", lambda **request: refused)  # what S3 answers: 200, errors in the body
    with pytest.raises(OSError, match=f"cannot delete s3://{bucket}/runs/one/_FAILED \\(AccessDenied: Access Denied\\)"):
        store.delete(["_FAILED"])
    monkeypatch.undo()
    store.delete(["_FAILED"])
    assert store.get("_FAILED") is None


def test_large_upload_is_multipart(bucket: str, tmp_path) -> None:  # noqa: F811, ANN001
    store = S3Store(f"s3://{bucket}/out", part_size=5 * 2**20)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (11 * 2**20))
    store.upload("big", str(big))
    head = boto3.client("s3").head_object(Bucket=bucket, Key="out/big")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert head["ContentLength"] == 11 * 2**20


@pytest.mark.parametrize("size", [0, 5 * 2**20 - 1, 5 * 2**20, 17 * 2**20 + 3])
def test_a_streamed_object_appears_whole_at_commit_and_never_after_abort(
    store: Store, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import job.store

    monkeypatch.setattr(job.store, "STREAM_PART_SIZE", 5 * 2**20)  # S3's smallest part: several parts
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    writer = store.writer("out/big.tsv")
    for start in range(0, size, 3 * 2**20 + 7):  # pieces that do not line up with the parts
        writer.write(data[start:start + 3 * 2**20 + 7])
    assert store.get("out/big.tsv") is None and store.list("out/") == []  # nothing visible yet
    writer.commit()
    assert store.get("out/big.tsv").data == data
    dropped = store.writer("out/dropped.tsv")
    dropped.write(data)
    dropped.abort()
    assert store.list("out/") == ["out/big.tsv"]
    if isinstance(store, LocalStore):  # no temporary file left in the output, hidden or not
        assert [p.name for p in Path(store.uri).rglob("*") if p.is_file()] == ["big.tsv"]
    if isinstance(store, S3Store):  # sent in parts from 5 MiB on, and no parts left behind to be billed
        etag = boto3.client("s3").head_object(Bucket=store.bucket, Key=store.prefix + "out/big.tsv")["ETag"]
        assert ("-" in etag) == (size >= 5 * 2**20), etag
        assert boto3.client("s3").list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_local_upload_and_atomic_names(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path / "out"))
    source = tmp_path / "src"
    source.write_text("hello")
    store.upload("final.txt", str(source))
    store.replace("final.txt", b"x", "nope")  # leaves a lock file, which list() hides
    assert (tmp_path / "out" / "final.txt").read_text() == "hello"
    assert store.list("") == ["final.txt"]


STOPPED_WRITER = """
import os, signal, sys
import job.store
from job.store import LocalStore

store = LocalStore(sys.argv[1])
real_replace = os.replace

def stop_here(*args):  # stopped in the middle of a replace, as SIGSTOP or a suspend would
    os.kill(os.getpid(), signal.SIGSTOP)
    real_replace(*args)

job.store.os.replace = stop_here
current = store.get("rec")
print("replacing", flush=True)
store.replace("rec", b"from the stopped writer", current.etag)
"""


def test_a_stopped_writer_blocks_nobody(tmp_path) -> None:  # noqa: ANN001
    """A process stopped (SIGSTOP) in the middle of a local compare-and-swap holds nothing
    that others wait for: their reads see its write or not, and their writes go on."""
    import os
    import signal
    import subprocess
    import sys

    from job_support import subprocess_env

    store = LocalStore(str(tmp_path / "out"))
    store.create("rec", b"v0")
    writer = subprocess.Popen(
        [sys.executable, "-c", STOPPED_WRITER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )
    try:
        assert writer.stdout.readline() == "replacing\n"
        deadline = time.monotonic() + 30
        while "T" not in open(f"/proc/{writer.pid}/stat").read().split()[2]:  # wait until it is stopped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        results: list[object] = []

        def write() -> None:
            current = store.get("rec")
            results.append(current.data)
            results.append(store.replace("rec", b"from a live writer", current.etag))

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "a live writer waited for the stopped one"
        assert results[0] == b"from the stopped writer"  # its version was stored before it stopped
        assert results[1] is not None and store.get("rec").data == b"from a live writer"
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.wait(timeout=30)
    assert store.get("rec").data == b"from a live writer"  # its late rename does not bring it back
    assert store.list("") == ["rec"]


def test_a_full_disk_leaves_no_temporary_files(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import errno
    import os

    import job.store

    store = LocalStore(str(tmp_path / "out"))
    etag = store.create("rec", b"v0")
    source = tmp_path / "src"
    source.write_bytes(b"output")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job.store.os, "fsync", full)
    monkeypatch.setattr(job.store.shutil, "copyfile", lambda *a: (open(a[1], "wb").write(b"half"), full()))
    for attempt in (lambda: store.put("part", b"x"), lambda: store.replace("rec", b"v1", etag),
                    lambda: store.create("new", b"x"), lambda: store.upload("out.txt", str(source))):
        with pytest.raises(OSError):
            attempt()
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert leftovers == ["rec"], leftovers
