"""The one configuration object of a run: built by the CLI, passed down unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunConfig:
    """Everything `virnucpro run` was asked to do.

    Fields that change results (the models, chunk length, group size, reuse, threshold and
    which optional outputs are written: job/batch.py's settings) are recorded in the plan
    header (`_run/plan.json`) and compared on resume; the rest only steer how the work is done.
    """

    inputs: tuple[str, ...]
    output: str
    esm_model: str
    dnabert_model: str
    classifier: str
    chunk_length: int | None = None  # None: taken from the classifier's name or metadata
    force_chunk_length: bool = False
    device: str = "auto"  # auto | cpu | cuda
    batch_tokens: int | None = None  # None: derived from free device memory
    compile: bool | None = None  # None: torch.compile on a GPU, eager on the CPU; True: on the CPU too; False: never
    write_features: bool = False
    # Results a person reads (issue 15). The threshold and the viral reads change what the
    # workers write, so both are recorded in the plan; the price and log format do not.
    min_virus_score: float | None = None  # None: the published rule, max P(virus) >= max P(others)
    write_viral_reads: bool = False
    gpu_hour_price: float | None = None  # the report's cost line
    log_format: str = "auto"  # auto: a progress bar when stderr is a terminal, else JSON lines | json
    # Batch-job steering (issue 4): sharding, leases, checkpoints, signals, storage.
    workers: int | None = None  # None: one per visible GPU, else 1
    slot: int | None = None
    slots: int | None = None
    shard_reads: int | None = None  # None: automatic, from the inputs' size (job/plan.py)
    # Reads scored together. Batched kernels round differently for different batch
    # compositions, so each shard is scored in fixed groups from its first read: the same
    # scores however often the shard is interrupted. Changes results: recorded in the plan.
    group_reads: int = 512
    # Each distinct nucleotide slice and protein of a shard embedded once (core/pipeline.py).
    # Off embeds every frame again (for benchmarks). On a GPU it changes the last digits of
    # scores, so it is recorded in the plan too.
    reuse: bool = True
    checkpoint_seconds: float = 30.0
    grace_seconds: float = 25.0
    lease_seconds: float = 120.0
    max_attempts: int = 3  # failed attempts (errors, not interruptions) before a shard is given up
    retry_failed: bool = False  # a run that ended _FAILED: run its failed shards again
    s3_endpoint_url: str | None = None
    model_cache: str = field(default="~/.cache/virnucpro/models")
    imds_url: str = "auto"  # job/spot.py: polled only on EC2 / AWS platforms, or this URL
