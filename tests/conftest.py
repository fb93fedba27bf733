"""Shared fixtures: the published tool's reference files and tiny demo models."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
runpy.run_path(str(Path(__file__).resolve().parent / "loopback_only" / "sitecustomize.py"))  # pytest too
REFERENCE = REPO.parent / "shared" / "reference" / "original"


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference files not found at {REFERENCE}: check out ../shared beside the repo")
    return REFERENCE


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR written by `virnucpro make-demo-models DIR`, once per test session."""
    from job.cli import main

    directory = tmp_path_factory.mktemp("demo-models")
    assert main(["make-demo-models", str(directory)]) == 0
    return directory
