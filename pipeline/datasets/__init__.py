"""Dataset adapters by the names users type. Adding one: import its class and add an entry below."""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import KINDS, DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.cremad import CremaD
from pipeline.datasets.folder import FolderDataset
from pipeline.datasets.food101 import UPMCFood101
from pipeline.datasets.iemocap import Iemocap
from pipeline.datasets.kinetics import Kinetics400, KineticsSounds
from pipeline.datasets.mvsa import MVSASingle

DATASETS: dict[str, type[DatasetAdapter]] = {
    "folder": FolderDataset,
    "mvsa": MVSASingle,
    "cremad": CremaD,
    "ks": KineticsSounds,
    "k400": Kinetics400,
    "iemocap": Iemocap,
    "food101": UPMCFood101,
}


def get_dataset(name: str, data_root: str | Path, **options) -> DatasetAdapter:
    """Build the adapter registered as ``name`` over ``data_root`` (options are adapter-specific)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_root, **options)


__all__ = ["DATASETS", "KINDS", "DatasetAdapter", "DatasetError", "DatasetListing", "SampleRef", "Skipped",
           "get_dataset"]
