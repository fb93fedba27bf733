"""features.h5: frame ids and their feature vectors, in prediction_results order."""
from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np


class FeatureWriter:
    """Appends rows to `frame_ids` (utf-8) and `features` (float32 [frames, dim], DNA first)."""

    def __init__(self, path: str, dim: int) -> None:
        self._file = h5py.File(path, "w")
        self._ids = self._file.create_dataset(
            "frame_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(4096,)
        )
        self._features = self._file.create_dataset(
            "features", shape=(0, dim), maxshape=(None, dim), dtype="float32", chunks=(1024, dim)
        )

    def append(self, frame_ids: Sequence[str], features: np.ndarray) -> None:
        if not len(frame_ids):
            return
        start = self._ids.shape[0]
        end = start + len(frame_ids)
        self._ids.resize((end,))
        self._features.resize((end, self._features.shape[1]))
        self._ids[start:end] = list(frame_ids)
        self._features[start:end] = features.astype(np.float32, copy=False)

    def close(self) -> None:
        self._file.close()
