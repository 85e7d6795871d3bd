"""What every dataset adapter yields: sample references with labels and splits, and what it skipped.

An adapter knows one dataset's official on-disk layout. It does not decode media: it lists samples
(``SampleRef``) whose ``sources`` name, per modality, a file path (image, audio, video) or the text
itself (text). Decoding happens later, in DataLoader workers (``pipeline/decode.py``), so that a
corrupt file costs one skipped sample, never the run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

# The kinds of raw input a backbone can encode; a dataset modality has exactly one kind.
KINDS = ("image", "text", "audio", "video")


class DatasetError(Exception):
    """The data root does not hold the expected layout, or an option is invalid. One clear line."""


def check_options(dataset: str, options, known, note: str = "") -> None:
    """Refuse any ``-o`` key the adapter does not read, listing the ones it does.

    Why: an option an adapter silently ignores (``-o split=actor`` on a dataset whose splits come
    from its files, a typo such as ``-o seeds=3``) would extract the whole dataset with settings the
    user did not ask for, and nothing would tell. Every adapter calls this, directly or through
    ``SplitPolicy``; values are checked where each option is read.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise DatasetError(f"{dataset}: unknown option(s) {', '.join(unknown)}; known: {valid}{note}")


@dataclass
class SampleRef:
    """One sample before decoding. ``sources[m]`` is a path (str) for media or the text for text.

    ``window`` optionally restricts an audio/video source to ``(start_s, end_s)`` seconds (IEMOCAP
    utterances inside a dialogue video, for example). A modality missing from ``sources`` is absent
    for that sample.
    """

    sample_id: str
    label: int
    split: str
    sources: dict[str, str]
    window: tuple[float, float] | None = None


@dataclass
class Skipped:
    """A sample the adapter left out, and why (unreadable label line, label outside the scheme...)."""

    sample_id: str
    reason: str


@dataclass
class DatasetListing:
    """Everything an adapter found: samples with splits assigned, what it skipped, and how it split."""

    samples: list[SampleRef]
    skipped: list[Skipped] = field(default_factory=list)
    split_rule: str = ""


class DatasetAdapter(ABC):
    """Base of all dataset adapters. Subclasses set the class attributes and implement ``listing``.

    ``modalities`` maps modality name (as stored in the cache) to its kind in ``KINDS``.
    """

    name: str = ""
    modalities: dict[str, str] = {}
    description: str = ""
    layout: str = ""  # the on-disk layout the adapter expects, shown by `cli.py datasets`

    def __init__(self, data_root: str | Path, **options):
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise DatasetError(f"data root {self.data_root} does not exist or is not a folder")
        self.options = options

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Class names in label-id order (they may depend on options, e.g. IEMOCAP 4 vs 6 classes)."""

    @abstractmethod
    def listing(self) -> DatasetListing:
        """List every sample with its split assigned, plus what was skipped and why."""
