"""The worker side of an extraction: each DataLoader worker decodes and preprocesses samples and collates them.

A sample whose media cannot be decoded or preprocessed does not raise: its reason travels with the
batch (``failed``), and ``Collate`` drops the samples that cannot be stored, so that one odd file
costs its sample, never the run. ``Collate`` groups each modality over the samples that have it.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.datasets.base import SampleRef
from pipeline.decode import DecodeError


class SampleSet(torch.utils.data.Dataset):
    """Decodes and preprocesses one sample per item (in a worker); failures become reasons, not errors."""

    def __init__(self, refs: list[SampleRef], modalities: dict[str, str], pre, frames: int):
        self.refs, self.modalities, self.pre, self.frames = refs, modalities, pre, frames

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        ref = self.refs[i]
        inputs, failed = {}, {}
        for m, kind in self.modalities.items():
            source = ref.sources.get(m)
            if source is None:
                continue  # absent for this sample, by the dataset's own listing
            # A single odd file must not end a day-long run: any error becomes this sample's reason.
            try:
                decoded = self.pre.load(kind, source, ref.window, self.frames)
            except DecodeError as err:
                failed[m] = str(err)
                continue
            except Exception as err:
                failed[m] = f"decoding failed ({type(err).__name__}: {str(err)[:150]})"
                continue
            try:
                inputs[m] = self.pre.prepare(kind, decoded)
            except Exception as err:
                failed[m] = f"preprocessing failed ({type(err).__name__}: {str(err)[:150]})"
        return {"id": ref.sample_id, "label": ref.label, "split": ref.split, "inputs": inputs, "failed": failed}


class Collate:
    """Drops unusable samples, then collates each modality over the samples that have it."""

    def __init__(self, modalities: dict[str, str], pre, keep_partial: bool):
        self.modalities, self.pre, self.keep_partial = modalities, pre, keep_partial

    def __call__(self, items):
        failures = [(it["id"], m, reason) for it in items for m, reason in it["failed"].items()]
        keep = [it for it in items if it["inputs"] and (self.keep_partial or not it["failed"])]
        failures += [(it["id"], "", "no source for the extracted modalities")
                     for it in items if not it["inputs"] and not it["failed"]]
        batch = {
            "ids": [it["id"] for it in keep], "labels": [it["label"] for it in keep],
            "splits": [it["split"] for it in keep], "failures": failures, "size": len(items),
            "present": {}, "rows": {}, "inputs": {},
        }
        for m, kind in self.modalities.items():
            rows = [i for i, it in enumerate(keep) if m in it["inputs"]]
            batch["present"][m] = np.array([m in it["inputs"] for it in keep], dtype=bool)
            batch["rows"][m] = np.array(rows, dtype=np.int64)
            if rows:
                batch["inputs"][m] = self.pre.collate(kind, [keep[i]["inputs"][m] for i in rows])
        return batch
