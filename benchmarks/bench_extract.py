"""Stage one's overhead: extraction throughput against the same workers' decode-only rate.

Generates N photo-sized JPEGs, then measures (1) the DataLoader alone, with the engine's own
dataset and collate (decode + the backbone's preprocessing, no model, no cache) and (2) the whole
pipeline (`run_extraction`: the same loader, a tiny CLIP at 224 px, the cache writer). With a model
this small the pipeline should be bound by decoding; the target is pipeline >= 0.70 x decode-only.
Both passes run twice, alternating, and the better of each is kept (the machines are shared).

    .venv/bin/python benchmarks/bench_extract.py [--images 400] [--workers 2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.backbones import build_backbone, prepare_torchvision  # noqa: E402
from pipeline.datasets import get_dataset  # noqa: E402
from pipeline.extract import run_extraction  # noqa: E402
from pipeline.loader import Collate, SampleSet  # noqa: E402

# A ViT with CLIP-L/14's input pipeline (224 px, bicubic resize, centre crop) and a tiny trunk.
TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def make_data(root: Path, n: int) -> None:
    """``n`` 500x375 JPEGs (the size of Food-101/MVSA photos) with smooth content, and a samples.csv."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = ["sample_id,label,split,image_path"]
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        img = np.stack([127 + 120 * np.sin(f[c] * (xx + yy * (c + 1)) + i) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "img" / f"{i}.jpg", quality=90)
        rows.append(f"{i:05d},{'ab'[i % 2]},{('train', 'val', 'test')[i % 3]},img/{i}.jpg")
    (root / "samples.csv").write_text("\n".join(rows) + "\n")


def tiny_clip_weights(folder: Path) -> Path:
    prepare_torchvision()
    import open_clip

    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def decode_only(dataset, backbone, workers: int, batch_size: int) -> float:
    """Items/s of the engine's loader alone: decode + preprocess + collate in the workers."""
    refs = dataset.listing().samples
    modalities = {"image": "image"}
    pre = backbone.preprocessor()
    loader = torch.utils.data.DataLoader(
        SampleSet(refs, modalities, pre, 1), batch_size=batch_size, num_workers=workers,
        collate_fn=Collate(modalities, pre, False), prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    n = sum(batch["size"] for batch in loader)
    return n / (time.perf_counter() - start)


def pipeline(dataset, backbone, workers: int, batch_size: int, cache: Path) -> float:
    """Items/s of the whole extraction (loader, model, cache writer, manifest)."""
    start = time.perf_counter()
    summary = run_extraction(dataset, backbone, "clip-tiny", cache, batch_size=batch_size, workers=workers,
                             progress=False)
    assert summary.in_cache == summary.listed
    return summary.listed / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", args.images)
        dataset = get_dataset("folder", tmp / "data")
        backbone = build_backbone("clip", tiny_clip_weights(tmp / "clip"))
        decode_rates, pipe_rates = [], []
        for rep in range(2):
            decode_rates.append(decode_only(dataset, backbone, args.workers, args.batch_size))
            pipe_rates.append(pipeline(dataset, backbone, args.workers, args.batch_size, tmp / f"cache{rep}"))
    decode, pipe = max(decode_rates), max(pipe_rates)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"{args.images} JPEGs 500x375, workers {args.workers}, batch {args.batch_size}, tiny CLIP at 224 px")
    print(f"decode-only  {decode:7.1f} items/s   (runs: {', '.join(f'{r:.1f}' for r in decode_rates)})")
    print(f"pipeline     {pipe:7.1f} items/s   (runs: {', '.join(f'{r:.1f}' for r in pipe_rates)})")
    print(f"ratio        {pipe / decode:7.2f}   (target >= 0.70)")


if __name__ == "__main__":
    main()
