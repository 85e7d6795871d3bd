"""Backbones by the names users type: name -> (family class, config preset over the family defaults).

``build_backbone('clip-vit-l14', weights=...)`` loads one. A family name (``clip``, ``resnet``...)
gives its defaults; ``config`` overrides any key (``{"arch": "ViT-B-32"}`` for another open_clip
architecture, ``{"prompts": {...}}`` for the LLMs).
"""
from __future__ import annotations

import torch

from pipeline.backbones.base import Backbone, BackboneError, Preprocessor, prepare_torchvision
from pipeline.backbones.clip import CLIPBackbone
from pipeline.backbones.llava import LlavaBackbone
from pipeline.backbones.ola import OlaBackbone
from pipeline.backbones.resnet import ResNetBackbone
from pipeline.backbones.whisper import WhisperBackbone

BACKBONES: dict[str, tuple[type[Backbone], dict]] = {
    "clip-vit-l14": (CLIPBackbone, {"arch": "ViT-L-14"}),
    "clip-vit-l14-openai": (CLIPBackbone, {"arch": "ViT-L-14", "quick_gelu": True}),
    "whisper-large-v3": (WhisperBackbone, {}),
    "resnet18": (ResNetBackbone, {"arch": "resnet18"}),
    "resnet50": (ResNetBackbone, {"arch": "resnet50"}),
    "llava7b": (LlavaBackbone, {}),
    "ola7b": (OlaBackbone, {}),
    "clip": (CLIPBackbone, {}),
    "whisper": (WhisperBackbone, {}),
    "resnet": (ResNetBackbone, {}),
    "llava": (LlavaBackbone, {}),
    "ola": (OlaBackbone, {}),
}

# The width D of the published weights each name is meant for, shown by `cli.py backbones` before
# any weights load; the family names take D from whatever weights they are given.
DIMS: dict[str, int] = {
    "clip-vit-l14": 768, "clip-vit-l14-openai": 768, "whisper-large-v3": 1280, "resnet18": 512,
    "resnet50": 2048, "llava7b": 4096, "ola7b": 3584,
}


def output_shapes(name: str) -> str:
    """``image [1, 768], video [K frames, 768]``: the ``[T, D]`` per input kind of a registry name."""
    cls, _ = BACKBONES[name]
    dim = DIMS.get(name, "D from the weights")
    return ", ".join(f"{kind} [{cls.tokens(kind, 'K frames')}, {dim}]" for kind in cls.kinds)


def build_backbone(name: str, weights, config: dict | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, *, fast: bool = True, image_decode: str = "auto") -> Backbone:
    """Load the backbone registered as ``name`` from local ``weights``, with ``config`` over its preset.

    ``fast=False`` gives the plain path (float32 weights under autocast, preprocessing all in the
    workers), kept to compare against; ``image_decode``: ``auto``, ``cpu`` or ``device`` (nvJPEG).
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    cls, preset = BACKBONES[name]
    return cls(weights, {**preset, **(config or {})}, device, dtype, fast=fast, image_decode=image_decode)


__all__ = ["BACKBONES", "DIMS", "output_shapes", "Backbone", "BackboneError", "Preprocessor", "build_backbone", "prepare_torchvision"]
