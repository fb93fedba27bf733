"""Model arguments made local and checksummed, so a run can tell whether its models changed.

An `s3://` model (a file, or a directory prefix for DNABERT-S) is downloaded once into the
model cache and reused while its ETags stay the same; a fair-esm model name
(`esm2_t36_3B_UR50D`) is downloaded once from fair-esm's site into torch's hub cache, where
fair-esm keeps it. Every model's sha256 (of the file, or
of the sorted per-file digests of a directory) is recorded in the plan; a name that is
neither a local path nor an S3 URI (a hub id) is recorded as given; a local model's digest is
remembered in the model cache while its files keep their sizes and times, and so is the
answer of the models' checks (`checked_models`). Workers on a GPU keep the encoders' weights
as run, and the compiler's artifacts, beside the downloads (`weights_cache`,
`compiler_cache_dir`; the formats are job.model_cache's), and read the weights ahead
(`read_ahead`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from core.errors import ModelLoadError
from job import s3
from job.errors import BadInput, Interrupted

if TYPE_CHECKING:
    from job.model_cache import WeightsCache

_BLOCK = 8 * 2**20
STALE_STAGING_SECONDS = 3600  # a staging directory unchanged this long belongs to a killed download
RACY_SECONDS = 2  # coarser than any file system clock tick the model cache may sit on
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models"  # where fair-esm downloads its models
FAIR_ESM_NAME = re.compile(r"esm2_t\d+_\d+[MB]_UR50D")
DOWNLOAD_TIMEOUT_S = 60
CHECKS_VERSION = 1  # bump when core.pipeline.check_models checks something new: earlier answers are unused


@dataclass(frozen=True)
class LocalModel:
    """Where a model argument lives on this machine, and its checksum."""

    source: str  # the argument as given
    path: str  # local path the loaders read (the source itself for hub ids)
    sha256: str | None  # None for a name the loader resolves itself

    def identity(self) -> dict[str, str | None]:
        """What the plan compares on resume: the checksum, or the name when there is none."""
        return {"sha256": self.sha256} if self.sha256 else {"name": self.source}


def localize_model(
    source: str, cache_dir: str, endpoint_url: str | None, stop: threading.Event | None = None,
) -> LocalModel:
    """The model on this machine; an `s3://` download gives up (Interrupted) once `stop` is set."""
    if s3.is_s3(source):
        path, digest = _download(source, Path(cache_dir).expanduser(), endpoint_url, stop or threading.Event())
        return LocalModel(source, str(path), digest)
    path = Path(source).expanduser()
    if path.exists():
        return LocalModel(source, str(path), remembered_sha256(path, Path(cache_dir).expanduser() / "digests"))
    if FAIR_ESM_NAME.fullmatch(source):
        return LocalModel(source, str(fair_esm_checkpoint(source, stop or threading.Event())), None)
    return LocalModel(source, source, None)


def fair_esm_checkpoint(name: str, stop: threading.Event) -> Path:
    """The checkpoint of the fair-esm model `name` in torch's hub cache, downloaded there once
    (as `esm.pretrained` does) when missing; a download gives up (Interrupted) once `stop`
    is set, fails within DOWNLOAD_TIMEOUT_S when offline, and fails when the connection
    closes before the size the server announced; none of these leaves a partial file."""
    import torch.hub  # the parent imports torch for its model checks anyway

    destination = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if destination.is_file():
        return destination
    url = f"{FAIR_ESM_URL}/{name}.pt"
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=f".{name}.", delete=False)
    try:
        with part, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            expected, received = response.headers.get("Content-Length"), 0
            while block := response.read(_BLOCK):
                if stop.is_set():
                    raise Interrupted(f"stopped while downloading ESM-2 model {name!r}")
                part.write(block)
                received += len(block)
        # a connection closed early ends the reads quietly: a short file would pass for the model
        if expected is not None and received != int(expected):
            raise ModelLoadError(
                f"the download of ESM-2 model {name!r} from {url} ended after {received:,} of "
                f"{int(expected):,} bytes; run again to download it again"
            )
        os.replace(part.name, destination)
    except OSError as error:
        raise ModelLoadError(
            f"cannot download ESM-2 model {name!r} from {url} ({error}); download that file "
            f"where there is network access and pass its local path instead of the name"
        ) from None
    finally:
        Path(part.name).unlink(missing_ok=True)
    return destination


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of 'relative/path digest' lines of every file of a directory."""
    if path.is_file():
        return _sha256_file(path)
    lines = [
        f"{file.relative_to(path).as_posix()} {_sha256_file(file)}\n"
        for file in sorted(p for p in path.rglob("*") if p.is_file())
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def remembered_sha256(path: Path, memo_dir: Path) -> str:
    """`sha256_path(path)`, remembered in `memo_dir` with each file's size and modification
    time (as make and rsync judge a file unchanged): ESM-2 3B is 11 GB, seconds of hashing at
    every start otherwise. A file rewritten with another size or time is hashed again; one
    modified in the last RACY_SECONDS before hashing is not remembered, since a rewrite
    within the file system's clock tick could keep its time (git's "racily clean" rule)."""
    path = path.resolve()
    memo = memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    stats = _stats(path)
    try:
        recorded = json.loads(memo.read_text())
        if recorded["path"] == str(path) and recorded["files"] == stats:
            return recorded["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.time_ns()
    digest = sha256_path(path)
    if _stats(path) != stats or max((s[2] for s in stats), default=0) > started - RACY_SECONDS * 10**9:
        return digest  # changed while hashed, or too recently to tell a rewrite apart
    _remember(memo, {"path": str(path), "files": stats, "sha256": digest})  # else hashed again next time
    return digest


def _remember(memo: Path, body: dict) -> None:
    """Write a memo of the model cache whole or not at all (a temporary file renamed); a
    read-only model cache is no error, the memo is only missing next time."""
    staging = memo.with_name(f".{memo.name}.{uuid.uuid4().hex}")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(body))
        os.replace(staging, memo)
    except OSError:
        staging.unlink(missing_ok=True)


def _stats(path: Path) -> list[list]:
    """[relative name, size, mtime_ns] of the file, or of every file of the directory."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[file.relative_to(path).as_posix() if file != path else "", *_size_and_time(file)] for file in files]


def _size_and_time(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _download(uri: str, cache_dir: Path, endpoint_url: str | None, stop: threading.Event) -> tuple[Path, str]:
    """The cached copy of `uri` (downloaded when missing or changed) and its sha256.

    A download is staged in a directory of its own beside the entry and renamed into place
    when complete, so a copy is whole or absent. Each object is read at the ETag listed (GET
    If-Match), so the copy is the version the manifest records. A stop between blocks ends
    the download with its staging directory removed; one left by a killed process is removed
    by the next download of the same model once it has not changed for STALE_STAGING_SECONDS.
    """
    fs = s3.filesystem(endpoint_url)
    remote = uri.removeprefix("s3://").rstrip("/")
    if fs.isfile(remote):
        files = {"": fs.info(remote)}
    elif fs.isdir(remote):
        files = {p[len(remote) + 1:]: fs.info(p) for p in sorted(fs.find(remote))}
    else:
        raise BadInput(f"model {uri} does not exist; check the bucket, the key and --s3-endpoint-url")
    etags = {name: str(info.get("ETag", "")) for name, info in files.items()}
    entry = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = entry / (Path(remote).name or "model")
    manifest = entry / "manifest.json"
    if cached := _cached(manifest, etags):
        return target, cached
    _remove_stale_staging(cache_dir, entry.name)
    staging = cache_dir / f".{entry.name}.{uuid.uuid4().hex}"
    staged = staging / target.name
    client = s3.client(endpoint_url)
    try:
        for name in files:
            local = staged / name if name else staged
            local.parent.mkdir(parents=True, exist_ok=True)
            bucket, key = s3.split_uri(f"s3://{remote}/{name}" if name else f"s3://{remote}")
            try:
                body = client.get_object(Bucket=bucket, Key=key, IfMatch=etags[name])["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
                raise BadInput(f"model {uri} changed while it was being downloaded; rerun the same command") from None
            with open(local, "wb") as out:
                for block in body.iter_chunks(_BLOCK):
                    if stop.is_set():
                        raise Interrupted(f"stopped while downloading {uri}")
                    out.write(block)
        digest = sha256_path(staged)
        (staging / "manifest.json").write_text(json.dumps({"uri": uri, "etags": etags, "sha256": digest}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if _cached(manifest, etags):  # another process on this machine finished first
        shutil.rmtree(staging, ignore_errors=True)
        return target, digest
    shutil.rmtree(entry, ignore_errors=True)  # a stale copy: the object changed
    os.rename(staging, entry)
    return target, digest


def _remove_stale_staging(cache_dir: Path, entry: str) -> None:
    """Remove the staging directories of this entry that nothing wrote to for
    STALE_STAGING_SECONDS: their downloads were killed (a live one writes every second, and
    hashing even ESM-2 3B's 11 GB takes well under that)."""
    for staging in cache_dir.glob(f".{entry}.*"):
        try:
            newest = max((p.stat().st_mtime for p in staging.rglob("*")), default=staging.stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
        if time.time() - newest > STALE_STAGING_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)


def _cached(manifest: Path, etags: dict[str, str]) -> str | None:
    """The recorded sha256 when the cached copy matches the objects' current ETags."""
    if not manifest.exists():
        return None
    recorded = json.loads(manifest.read_text())
    return recorded["sha256"] if recorded["etags"] == etags else None


def weights_cache(model_cache: str, identity: Mapping[str, object] | None) -> WeightsCache | None:
    """Where the converted weights of the model with this plan identity (its `identity()`)
    are kept: `converted/` in the model cache, keyed by the source's sha256. None for a
    model known only by name: without a checksum a changed source could not be noticed."""
    from job.model_cache import WeightsCache  # imports torch: only where models are loaded

    digest = (identity or {}).get("sha256")
    # written in the background: the first start does not wait for 5.6 GB to reach the disk
    return WeightsCache(_converted_dir(model_cache), str(digest), in_background=True) if digest else None


def checked_models(
    models: Mapping[str, LocalModel], chunk_length: int | None, force_chunk_length: bool, model_cache: str,
) -> tuple[int, int, bool]:
    """core.pipeline.check_models' answer (the chunk length, the feature width, whether these
    are demo-size models), remembered in the model cache under the models' sha256 and the
    arguments, as the same bytes always get the same answer. The checks import torch and
    build the encoders on the meta device: seconds at every start, spent while the workers
    start up and competing with them. Models known only by name are checked every time;
    CHECKS_VERSION and the package's version key the answer to the code that gave it."""
    digests = [models[name].sha256 for name in ("esm_model", "dnabert_model", "classifier")]
    memo = None
    if all(digests):
        key = json.dumps([digests, chunk_length, force_chunk_length, CHECKS_VERSION, _package_version()])
        memo = Path(model_cache).expanduser() / "checked" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        try:
            answer = json.loads(memo.read_text())
            return int(answer["chunk_length"]), int(answer["feature_dim"]), bool(answer["demo_models"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    from core.pipeline import PUBLISHED_DNA_DIM, PUBLISHED_PROTEIN_DIM, check_models  # torch

    length, width = check_models(models["esm_model"].path, models["dnabert_model"].path, models["classifier"].path,
                                 chunk_length, force_chunk_length)
    demo = width != PUBLISHED_DNA_DIM + PUBLISHED_PROTEIN_DIM
    if memo is not None:  # else checked again next time
        _remember(memo, {"chunk_length": length, "feature_dim": width, "demo_models": demo})
    return length, width, demo


def _package_version() -> str:
    try:
        return importlib.metadata.version("virnucpro")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "source"


def read_ahead(model_cache: str, identities: list[Mapping[str, object]]) -> threading.Thread:
    """Read the converted weights of these models (`weights_cache`; job.model_cache names
    each file by its source's sha256) once, in a background thread, so that they are in the
    page cache when the worker loads them. A worker starts by importing torch and its
    compiler, seconds of CPU work that leave the disk idle; on a fresh machine ESM-2 3B's
    5.6 GB come off the disk meanwhile instead of during the load. A hint only: a file that
    cannot be read is left to the load to report. Returns the started thread. The files are
    found by the end of `WeightsCache.path`'s name, as that module imports torch."""
    directory = _converted_dir(model_cache)
    digests = [str(identity.get("sha256")) for identity in identities if identity.get("sha256")]
    files = [path for digest in digests for path in directory.glob(f"*-{digest[:32]}.safetensors")]
    thread = threading.Thread(target=_read_through, args=(files,), daemon=True, name="read-ahead")
    thread.start()
    return thread


def _read_through(files: list[Path]) -> None:
    buffer = bytearray(_BLOCK)
    for path in files:
        try:
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        except OSError:
            continue


def _converted_dir(model_cache: str) -> Path:
    """Where the encoders' converted weights are kept (job.model_cache `WeightsCache`)."""
    return Path(model_cache).expanduser() / "converted"


def compiler_cache_dir(model_cache: str) -> Path:
    """Where the compiler's artifacts are kept (job.model_cache), beside the converted weights."""
    return Path(model_cache).expanduser() / "compiled"
