"""What makes a worker start fast: the encoders' weights as they run, and torch's compiler
artifacts, each kept in a local file (`job.models` picks the directory). The core loaders
write and read converted weights through a `core.engine.ConvertedWeights`, which
`WeightsCache` is; the files, their locks and their format are this module's alone.

Converted weights: loading ESM-2 3B from its fair-esm checkpoint means unpickling 11 GB of
float32 and converting it to float16 on the way to the GPU. Once done, the module's weights
as run are written to a safetensors file named by the source's sha256, the dtype and
`WEIGHTS_VERSION`; the next start memory-maps that file and copies it to the device without
reading the source. The file is written under a temporary name, fsynced and renamed, so a
writer killed mid-write leaves no file under the final name; a final file that is truncated
or altered anyway is refused (safetensors checks the header against the size, and an
xxh3-128 digest of the names and bytes, stored in the header, is checked as the tensors are
read), and the caller falls back to the source and writes it again. Writers of one file take
a lock, so workers starting together write it once; a lock that cannot be had (a file system
without locks) only costs a duplicate write, since the rename is atomic.

Compiler artifacts: `torch.compiler.save_cache_artifacts()` after the warm-up, loaded with
`load_cache_artifacts` before anything compiles, in a file keyed by torch's version, the GPU
and what the caller says the compiled code depends on. A file that cannot be used is
reported and ignored: the warm-up then compiles.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from torch import Tensor

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "virnucpro-converted-weights"
WEIGHTS_VERSION = "1"  # bump when what is stored, or how, changes: older files are then unused
ARTIFACTS_FORMAT = b"virnucpro-compiler-artifacts 1\n"


@dataclass(frozen=True)
class WeightsCache:
    """Where an encoder's converted weights are kept, and the sha256 of the source they
    were converted from (the key: a new source is a new file). With `in_background`, `write`
    copies the tensors to host memory and returns; a thread writes the file while the caller
    goes on (compiling, say); `finish_writes` waits for such threads."""

    directory: Path
    source_sha256: str
    in_background: bool = False

    def path(self, model: str, dtype: torch.dtype) -> Path:
        kind = str(dtype).removeprefix("torch.")
        return self.directory / f"{model}-{kind}-v{WEIGHTS_VERSION}-{self.source_sha256[:32]}.safetensors"

    def read(self, model: str, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The tensors on `device` and the metadata stored with them, or None when there is no
        usable file (missing, or refused with a warning: the caller loads the source)."""
        path = self.path(model, dtype)
        if not path.is_file():
            return None
        expected = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "model": model,
                    "dtype": str(dtype), "source_sha256": self.source_sha256}
        try:
            return read_weights(path, expected, device)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own type; a cache never stops a run
            log.warning("ignoring the converted weights in %s (%s: %s); loading the source instead",
                        path, type(error).__name__, error)
            return None

    def write(self, model: str, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
        """Store `state` (any device; not to be modified meanwhile) with `metadata`. False when
        another process is writing it now or it could not be written (a warning says why; the
        run goes on without it); in the background, True once the writer thread started."""
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
        path = self.path(model, dtype)
        header = {**metadata, "format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "model": model,
                  "dtype": str(dtype), "source_sha256": self.source_sha256}
        if not self.in_background:
            return _write_or_warn(path, state, header)
        # Copied to host memory here, on the caller's thread: once it goes on, the device is
        # left alone (a CUDA graph capture fails on another thread's copies).
        thread = threading.Thread(target=_write_or_warn, args=(path, _on_host(state), header), daemon=True,
                                  name=f"write-{path.name}")
        with _writers_lock:
            _writers.append(thread)
        thread.start()
        return True


_writers: list[threading.Thread] = []  # background writes of this process (WeightsCache.in_background)
_writers_lock = threading.Lock()


def _on_host(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` in host memory, tensors that share storage (tied weights) still shared."""
    copies: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}
    host = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu")
        host[name] = copies[key]
    return host


def _storage_key(tensor: Tensor) -> tuple[int, int, tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def finish_writes(timeout: float | None = None) -> bool:
    """Wait up to `timeout` seconds for this process's background writes; True when none is
    left. (A process that exits first leaves a temporary file, removed by a later writer.)"""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _writers_lock:
        threads = list(_writers)
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    with _writers_lock:
        _writers[:] = [t for t in _writers if t.is_alive()]
        return not _writers


def _write_or_warn(path: Path, state: Mapping[str, Tensor], header: Mapping[str, str]) -> bool:
    try:
        return write_weights(path, state, header)
    except OSError as error:
        log.warning("could not keep converted weights in %s (%s); the next start loads the source again",
                    path, error)
        return False


def write_weights(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
    """Write `state` as safetensors at `path`, atomically; tensors that share storage with an
    earlier one (tied weights) are stored once and recorded as aliases. False when another
    process holds the writer's lock (it is writing the same file).

    The file is streamed one tensor at a time (each copied to the host, hashed, written), so
    a GPU model needs no second copy in host memory, and the writes release the GIL."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        stored[name] = tensor.detach()
    with _writer_lock(path) as locked:
        if not locked:
            return False
        write_atomically(path, lambda temporary: _stream_safetensors(temporary, stored, {
            **metadata, "aliases": json.dumps(aliases, sort_keys=True)}))
    return True


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_DIGEST_PLACEHOLDER = "0" * 32  # an xxh3-128 hex digest's width: filled in once the data is written


def _stream_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """safetensors' layout (8-byte header length, JSON header, the tensors' bytes in the
    header's order) with metadata["digest"] the xxh3-128 of the names and bytes."""
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": {**metadata, "digest": _DIGEST_PLACEHOLDER}}
    offset = 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = xxhash.xxh3_128()
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            data = tensors[name].to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
            digest.update(name.encode() + b"\0")
            digest.update(data)
            handle.write(memoryview(data))
        where = text.index(f'"digest":"{_DIGEST_PLACEHOLDER}"'.encode()) + len(b'"digest":"')
        handle.seek(8 + where)
        handle.write(digest.hexdigest().encode())


def read_weights(path: Path, expected: Mapping[str, str], device: torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of `path` on `device` (aliases included, sharing their tensor) and its
    metadata. Raises ValueError when the metadata differs from `expected` or the digest from
    the bytes; safetensors raises its own error for a truncated or malformed file."""
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:  # memory-mapped
        metadata = handle.metadata() or {}
        wrong = {key: metadata.get(key) for key, value in expected.items() if metadata.get(key) != value}
        if wrong:
            raise ValueError(f"made for something else: {wrong}")
        digest = xxhash.xxh3_128()
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name)
            digest.update(name.encode() + b"\0")
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            tensors[name] = tensor.to(device) if device.type != "cpu" else tensor.clone()
    if digest.hexdigest() != metadata.get("digest"):
        raise ValueError("its bytes do not match the digest written with them (the file was altered)")
    for alias, name in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, metadata


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a temporary file beside `path`, fsync it, rename it to `path`: a
    reader sees the whole file or none. Temporary files of writers on this host that died
    (their pid is gone) are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    prefix = f".{path.name}.{socket.gethostname()}-"
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if not leftover.name.startswith(prefix):
            continue  # another host's (a shared file system): not ours to judge
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _writer_lock(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock for writing `path`: True when held (or when the file
    system has no locks), False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- the compiler's artifacts ----------------------------------------------------------------


def compiler_key(engine: Mapping[str, object], device: torch.device) -> str:
    """What compiled code depends on: torch (and Triton), the GPU, and `engine`, the caller's
    settings that shape it (the models, token budgets). 24 hex digits of their sha256."""
    identity: dict[str, object] = {"torch": torch.__version__, "engine": dict(engine), "device": device.type}
    try:
        import triton

        identity["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
        identity["capability"] = list(torch.cuda.get_device_capability(device))
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compiler_artifacts_path(directory: Path, key: str) -> Path:
    return directory / f"compiled-{key}.bin"


def load_compiler_artifacts(path: Path) -> tuple[str, set[str]]:
    """Hand the artifacts in `path` to torch before anything is compiled: ('loaded', their
    keys), ('missing', set()) or ('refused: why', set()) - never an exception."""
    if not path.is_file():
        return "missing", set()
    started = time.perf_counter()
    try:
        payload = _read_framed(path.read_bytes())
        info = torch.compiler.load_cache_artifacts(payload)
    except Exception as error:  # noqa: BLE001 - a cache never stops a run
        log.warning("ignoring the compiler artifacts in %s (%s: %s); compiling instead", path, type(error).__name__, error)
        return f"refused: {type(error).__name__}", set()
    keys = _artifact_keys(info)
    log.info("compiler artifacts loaded from %s in %.1f s", path, time.perf_counter() - started)
    return "loaded", keys


def save_compiler_artifacts(path: Path, loaded: set[str]) -> str:
    """Store what this process compiled (and loaded), unless it is what `path` already holds
    (`loaded`): 'saved', 'unchanged', 'nothing compiled' or 'failed: why'."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None or not saved[0]:
            return "nothing compiled"
        payload, info = saved
        if _artifact_keys(info) <= loaded:
            return "unchanged"
        header = json.dumps({"bytes": len(payload), "xxh3_128": xxhash.xxh3_128_hexdigest(payload)}).encode()

        def write(temporary: Path) -> None:
            temporary.write_bytes(ARTIFACTS_FORMAT + header + b"\n" + payload)

        with _writer_lock(path) as locked:
            if not locked:
                return "unchanged"  # another worker is saving them now
            write_atomically(path, write)
        return "saved"
    except Exception as error:  # noqa: BLE001 - a cache never stops a run
        log.warning("could not save the compiler artifacts to %s (%s: %s)", path, type(error).__name__, error)
        return f"failed: {type(error).__name__}"


def _read_framed(data: bytes) -> bytes:
    if not data.startswith(ARTIFACTS_FORMAT):
        raise ValueError("not a compiler-artifacts file of this version")
    header_line, _, payload = data[len(ARTIFACTS_FORMAT):].partition(b"\n")
    header = json.loads(header_line)
    if len(payload) != header["bytes"] or xxhash.xxh3_128_hexdigest(payload) != header["xxh3_128"]:
        raise ValueError("truncated or altered")
    return payload


def _artifact_keys(info: object) -> set[str]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {f"{kind}:{key}" for kind, keys in artifacts.items() for key in keys}
