"""S3 clients configured once: endpoint, retries with backoff, no caches shared across writers.

boto3 does the store's work (conditional writes, gets, lists, multipart uploads); s3fs
streams the inputs and models. Both use the normal credential chain and honour
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL themselves; an explicit endpoint (--s3-endpoint-url)
overrides them.
"""
from __future__ import annotations

from typing import Any

import boto3
import s3fs
from botocore.config import Config

# Throttling (SlowDown, 503) and 5xx are retried with exponential backoff and jitter;
# "adaptive" also slows this client down while S3 keeps throttling it.
RETRIES = {"max_attempts": 10, "mode": "adaptive"}
TIMEOUTS = {"connect_timeout": 10, "read_timeout": 120}


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/key' -> ('bucket', 'some/key')."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client with retries; `endpoint_url` None keeps boto3's own resolution."""
    config = Config(retries=RETRIES, **TIMEOUTS)  # type: ignore[arg-type]
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def filesystem(endpoint_url: str | None) -> s3fs.S3FileSystem:
    """An s3fs filesystem that never answers from a cache: other writers change the prefix."""
    return s3fs.S3FileSystem(
        skip_instance_cache=True,
        use_listings_cache=False,
        endpoint_url=endpoint_url,
        config_kwargs={"retries": RETRIES, **TIMEOUTS},
    )
