"""What both encoders share to run a model: the compile wrapper, its state for the log, the
check for non-finite embeddings, and the loop that runs packed batches on the device.

`Compiled` is the one place where `torch.compile` is called. A compiler failure (dynamo or
inductor cannot handle a function) is logged with its reason and that function runs eagerly
from then on; an error of the running program (CUDA out of memory, a kernel fault) is not a
compiler failure and is raised like any other error.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from core.errors import NonFiniteEmbedding
from core.packing import PackedBatch, PreparedBatches

log = logging.getLogger(__name__)


class ConvertedWeights(Protocol):
    """Where a loader keeps an encoder's weights as they run, converted once, and finds them
    at the next start: the job's `job.model_cache.WeightsCache`, a local file keyed by the
    source's sha256. core only reads and writes through it; where and how is the job's."""

    @property
    def source_sha256(self) -> str: ...

    @property
    def in_background(self) -> bool: ...  # write returns at once; the file is written by a thread

    def read(self, model: str, dtype: torch.dtype,
             device: torch.device) -> tuple[dict[str, Tensor], dict[str, str]] | None: ...

    def write(self, model: str, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool: ...


def compiler_errors() -> tuple[type[BaseException], ...]:
    """dynamo's and inductor's errors (most of inductor's arrive wrapped in dynamo's
    BackendCompilerFailed). Looked up when first needed, not at import: importing the
    compiler takes seconds that a worker spends while its weights load (job/worker.py)."""
    import torch._dynamo

    errors: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError

        errors += (InductorError,)
    except ImportError:  # older torch
        pass
    return errors


# Errors of the running program: never a reason to fall back, even when the compiler
# wraps them (an out-of-memory error while autotuning a kernel, say).
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
if hasattr(torch, "AcceleratorError"):  # torch >= 2.8: CUDA errors
    RUNTIME_ERRORS += (torch.AcceleratorError,)


class Compiled:
    """`fn`, or `torch.compile(fn)` (made on first use) with the token dimension of some
    arguments dynamic, so one graph serves every batch size and every layer.

    When the compiler fails, `error` says why, the fallback is logged, and `fn` runs eagerly
    from then on. Any other error raises.
    """

    def __init__(self, fn: Callable[..., object], dynamic_args: tuple[int | tuple[int, int], ...]) -> None:
        """dynamic_args: argument indices whose dim 0 is the token count, or (index, dim) pairs."""
        self.fn = fn
        self.dynamic_args = [(a, 0) if isinstance(a, int) else a for a in dynamic_args]
        self.compiled: Callable[..., object] | None = None
        self.error: str | None = None

    def __call__(self, *args: object, compile: bool = False) -> object:
        if not compile or self.error is not None:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn)
            for index, dim in self.dynamic_args:
                torch._dynamo.mark_dynamic(args[index], dim)
            return self.compiled(*args)
        except Exception as error:
            if not isinstance(error, compiler_errors()):
                raise
            cause = getattr(error, "inner_exception", None) or error.__cause__
            if isinstance(cause, RUNTIME_ERRORS):
                raise
            self.error = f"{type(error).__name__}: {str(error)[:300]}"
        log.warning("torch.compile failed for %s, running it eagerly from now on: %s",
                    self.fn.__name__, self.error)
        return self.fn(*args)


def compile_state(compile: bool, parts: tuple[Compiled, ...]) -> str:
    """'compiled', 'eager', or 'eager (why compiling failed)', for the log."""
    if not compile:
        return "eager"
    errors = [p.error for p in parts if p.error]
    return f"eager ({errors[0]})" if errors else "compiled"


def compiles(requested: bool | None, device: torch.device) -> bool:
    """Whether the per-layer pieces run torch.compile'd: as requested, and by default
    (None) on CUDA; the CPU runs them eagerly."""
    return device.type == "cuda" if requested is None else requested


def describe(dtype: torch.dtype, attention_name: str, state: str) -> str:
    """What runs, for the log: e.g. 'float16 varlen compiled' or 'float32 per_sequence eager'."""
    return f"{str(dtype).replace('torch.', '')} {attention_name} {state}"


def run_batches(prepared: PreparedBatches, device: torch.device, dim: int,
                pooled: Callable[[PackedBatch], Tensor]) -> tuple[Tensor, Tensor]:
    """Run `pooled` (an encoder's model and pooling) on each packed batch on `device`:
    ([count, dim] float32 in input order, [count] bool all-finite), both left on the device
    so nothing waits for the host."""
    out = torch.empty(prepared.count, dim, dtype=torch.float32, device=device)
    with torch.inference_mode():
        for host_batch, host_order in zip(prepared.batches, prepared.orders):
            batch = host_batch.to(device)
            order = host_order.to(device, non_blocking=True)
            out[order] = pooled(batch)
        finite = torch.isfinite(out).all(dim=1)
    return out, finite


def finished(model: str, result: tuple[Tensor, Tensor]) -> Tensor:
    """The embeddings of `run_batches` on the CPU; NonFiniteEmbedding names the inputs whose
    embedding holds a NaN or infinity."""
    out, finite = result
    out, finite = out.cpu(), finite.cpu()
    if not bool(finite.all()):
        raise NonFiniteEmbedding(model, torch.nonzero(~finite).flatten().tolist())
    return out
