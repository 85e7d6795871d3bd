"""ResNet-18/50 (torchvision) as a frozen image encoder: the pooled 512-/2048-d feature before ``fc``.

Weights: a torchvision state-dict file (e.g. ``resnet50-11ad3fa6.pth`` from torchvision's model
zoo, downloaded beforehand). Images are resized to ``image_size`` squared (no crop) and normalised
with ImageNet statistics, as the modality-imbalance references do. Video gives ``[K, D]``.
``layers`` overrides the blocks per stage (a tiny ``[1, 1, 1, 1]`` network for tests).

Fast path: the whole network in the compute dtype (BatchNorm included: in eval mode it is a fixed
per-channel affine map), uint8 images normalised on the device.
"""
from __future__ import annotations

import torch

from pipeline.backbones.base import (Backbone, BackboneError, ImagePrep, Preprocessor, device_pixels, load_checkpoint,
                                     no_init, prepare_torchvision, weights_path)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet50": ("Bottleneck", [3, 4, 6, 3])}


def imagenet_transform(size: int):
    prepare_torchvision()
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
    ])


class ResNetPreprocessor(Preprocessor):
    def __init__(self, images: ImagePrep):
        self.images = images

    def load(self, kind, source, window, frames):
        return self.images.load(source) if kind == "image" else super().load(kind, source, window, frames)

    def prepare(self, kind, decoded):
        if kind == "video":
            return self.images.frames(decoded)
        return self.images.one(decoded)

    def collate(self, kind, items):
        return self.images.collate(items) if kind == "image" else super().collate(kind, items)


class ResNetBackbone(Backbone):
    family = "resnet"
    kinds = ("image", "video")
    weights_layout = "a torchvision ResNet state-dict file (.pth)"
    defaults = {"arch": "resnet50", "layers": None, "image_size": 224}

    @classmethod
    def import_libraries(cls):
        prepare_torchvision()
        import torchvision.models  # noqa: F401

    def load(self, weights):
        path = weights_path(weights, expect="file", what=self.weights_layout)
        arch = self.config["arch"]
        if arch not in _ARCHS:
            raise BackboneError(f"unknown ResNet arch {arch!r}; known: {', '.join(_ARCHS)}")
        prepare_torchvision()
        from torchvision.models import resnet

        block, layers = _ARCHS[arch]
        with no_init(self.fast):  # the checkpoint (loaded strictly below) sets every weight
            model = resnet.ResNet(getattr(resnet, block), self.config["layers"] or layers)
        state = load_checkpoint(path, self.family)
        if not isinstance(state, dict):
            raise BackboneError(f"{path} is not a state dict: a torchvision ResNet checkpoint maps names to tensors")
        state = state.get("state_dict", state)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise BackboneError(f"{path} does not fit {arch}: {str(err).splitlines()[0][:300]}") from None
        self.dim = model.fc.in_features
        model.fc = torch.nn.Identity()
        self.weights_dtype = self.dtype if self.fast else torch.float32
        self.model = model.to(self.device, self.weights_dtype).eval().requires_grad_(False)
        self.images = ImagePrep(imagenet_transform(self.config["image_size"]), self.fast, self.image_decode == "device")
        self.info = {"weights": str(path), "dim": self.dim}

    def preprocessor(self):
        return ResNetPreprocessor(self.images)

    def encode(self, kind, batch):
        pixels = device_pixels(self.images, batch, self.weights_dtype, self.device, self.jpeg_decoder)
        if kind == "video":
            b, k = pixels.shape[:2]
            return self.model(pixels.flatten(0, 1)).view(b, k, -1), {}
        return self.model(pixels)[:, None], {}
