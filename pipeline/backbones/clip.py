"""CLIP through open_clip: images, video frames and text into one embedding space (ViT-L/14 by default).

Weights, one of:
- a folder with ``open_clip_config.json`` and ``open_clip_pytorch_model.bin``/``.safetensors`` (the
  layout of open_clip checkpoints on the HF hub, downloaded beforehand): the folder says everything;
- a state-dict file (``.safetensors``, ``.bin``, ``.pt``) for the built-in architecture ``arch``
  (any name in ``open_clip.list_models()``). A file path does not carry a pretrained tag's settings:
  OpenAI weights need ``quick_gelu: true``, laion2b weights ``mean``/``std`` of 0.5;
- OpenAI's original TorchScript file (``ViT-L-14.pt``), loaded with open_clip's OpenAI loader.

Features are the pooled, projected embeddings (L2-normalised when ``normalize``): ``[1, D]`` per
image or text, ``[K, D]`` for K video frames.

Fast path (the default): open_clip builds the model at the compute ``precision`` itself (bf16/fp16
weights for the convolutions, linears and attention, LayerNorm computed in float32: open_clip's
``LayerNormFp32``), directly on the device; images arrive as uint8 and are normalised there.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from pipeline.backbones.base import (Backbone, BackboneError, ImagePrep, Preprocessor, device_pixels, no_init,
                                     prepare_torchvision, unreadable_weights, weights_path)

_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class CLIPPreprocessor(Preprocessor):
    def __init__(self, images: ImagePrep, tokenizer):
        self.images = images
        self.tokenizer = tokenizer

    def load(self, kind, source, window, frames):
        return self.images.load(source) if kind == "image" else super().load(kind, source, window, frames)

    def prepare(self, kind, decoded):
        if kind == "image":
            return self.images.one(decoded)
        if kind == "video":
            return self.images.frames(decoded)
        return self.tokenizer([decoded])[0]  # text: [context_length] token ids, truncated

    def collate(self, kind, items):
        return self.images.collate(items) if kind == "image" else super().collate(kind, items)


def _is_torchscript(path: Path) -> bool:
    return zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())


class CLIPBackbone(Backbone):
    family = "clip"
    kinds = ("image", "video", "text")
    weights_layout = "an open_clip folder (open_clip_config.json + weights) or a state-dict / OpenAI .pt file"
    defaults = {
        "arch": "ViT-L-14",  # open_clip architecture, used when the weights are a single file
        "quick_gelu": False,  # true for OpenAI weights given as a state-dict file
        "normalize": True,  # L2-normalise the embeddings (CLIP space)
        "mean": None,  # per-channel normalisation override, e.g. [0.5, 0.5, 0.5] for laion2b weights
        "std": None,
    }

    @classmethod
    def import_libraries(cls):
        prepare_torchvision()
        import open_clip  # noqa: F401

    def load(self, weights):
        path = weights_path(weights, expect="any", what=self.weights_layout)
        prepare_torchvision()
        import open_clip

        cfg = self.config
        precision = _PRECISION.get(self.dtype, "fp32") if self.fast else "fp32"
        # Fast: built at its precision straight on the device without drawing random weights (6.5 s for
        # ViT-L/14 on a 2-core CPU), then the checkpoint is copied in (open_clip loads it strictly).
        common = {"image_mean": cfg["mean"], "image_std": cfg["std"], "precision": precision,
                  "device": self.device if self.fast else "cpu"}
        try:
            with torch.device(self.device if self.fast else "cpu"), no_init(self.fast):
                if path.is_dir():
                    if not (path / "open_clip_config.json").is_file():
                        raise BackboneError(f"{path} has no open_clip_config.json (or pass the weights file itself)")
                    name = f"local-dir:{path}"
                    model, _, transform = open_clip.create_model_and_transforms(name, **common)
                elif _is_torchscript(path):
                    name = cfg["arch"]
                    model = open_clip.load_openai_model(str(path), precision=precision, device=common["device"])
                    size = model.visual.image_size
                    transform = open_clip.image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"])
                else:
                    name = cfg["arch"]
                    if name not in open_clip.list_models():
                        raise BackboneError(f"unknown open_clip architecture {name!r} (see open_clip.list_models())")
                    model, _, transform = open_clip.create_model_and_transforms(
                        name, pretrained=str(path), force_quick_gelu=cfg["quick_gelu"], **common)
        except BackboneError:
            raise
        except Exception as err:  # torch, pickle, safetensors and open_clip each raise their own types
            raise (unreadable_weights(path, self.family, err) or BackboneError(
                f"cannot load CLIP weights from {path}: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300] if str(err) else ''}")) from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        # What the first convolution takes: the weights' dtype (float32 on the plain path, under autocast).
        self.pixel_dtype = next((p.dtype for p in model.visual.parameters() if p.ndim == 4), torch.float32)
        self.images = ImagePrep(transform, self.fast, self.image_decode == "device")
        self._pre = CLIPPreprocessor(self.images, open_clip.get_tokenizer(name))
        dim = getattr(model.visual, "output_dim", None)
        if dim is None:
            with torch.inference_mode():
                dim = self.model.encode_text(self._pre.prepare("text", "a")[None].to(self.device)).shape[-1]
        self.dim = int(dim)
        self.info = {"weights": str(path), "arch": name.split(":")[0] if path.is_dir() else name, "dim": self.dim,
                     "context_length": int(getattr(model, "context_length", 0) or 0)}

    def preprocessor(self):
        return self._pre

    def encode(self, kind, batch):
        norm = self.config["normalize"]
        if kind == "text":
            return self.model.encode_text(batch, normalize=norm)[:, None], {}
        pixels = device_pixels(self.images, batch, self.pixel_dtype, self.device, self.jpeg_decoder)
        if kind == "video":
            b, k = pixels.shape[:2]
            return self.model.encode_image(pixels.flatten(0, 1), normalize=norm).view(b, k, -1), {}
        return self.model.encode_image(pixels, normalize=norm)[:, None], {}
