"""Images on the fast path: uint8 from the workers, normalisation (and optionally JPEG decoding) on the device.

The plain path runs a backbone's whole torchvision transform in the DataLoader workers (resize,
crop, ``ToTensor``, ``Normalize``) and ships float32 tensors. The fast path splits that same
transform at ``ToTensor``:

- workers run the PIL steps (resize, crop, RGB) and hand over ``uint8 [3, H, W]`` (4x fewer bytes
  to pin and copy, no float work on the CPU);
- the device runs ``ToTensor`` + ``Normalize`` as one ``(x / 255 - mean) / std`` in float32, then
  casts to the compute dtype. In float32 this is the same arithmetic as the plain path (tested).

With ``image_decode="device"`` the workers do not decode JPEGs at all: they check the file (a
reduced-size PIL decode finds truncated files) and ship its bytes; the main process decodes the
batch with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and resizes/crops on the GPU
with antialiased interpolation. That resize is not PIL's to the last bit (a uint8 level or so;
tested against PIL within a stated tolerance), so it is a separate, opt-in-or-auto choice that
``meta.json`` records. Non-JPEG files and anything nvJPEG refuses are decoded by PIL instead.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decode import DecodeError, _check_file, _reason

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageSpec:
    """What the device needs to finish a split transform: normalisation, and for device decoding the geometry.

    ``resize``: torchvision ``Resize`` semantics (an int resizes the shorter side, a pair is (h, w));
    ``crop``: centre-crop (h, w) or None; ``interpolation``: ``bilinear``/``bicubic``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bicubic"


@dataclass
class JpegBytes:
    """A JPEG file's bytes, checked in the worker, to be decoded on the device."""

    data: torch.Tensor  # uint8 [n]


@dataclass
class HostList:
    """A batch's JPEG bytes: stays on the host (``to_device`` and the loader's pinning leave it alone),
    since the decoder reads host memory."""

    items: list


def split_transform(transform):
    """``(pil_steps, ImageSpec)`` for a torchvision ``Compose`` ending in ``ToTensor, Normalize``, else None.

    ``pil_steps`` is the Compose of everything before ``ToTensor``. The geometry of the spec is read
    from the ``Resize``/``CenterCrop`` among those steps when they are the only geometric ones (else
    the spec has none, and device decoding is not offered for this transform).
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    norm = steps[-1]
    mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
    pil = steps[:-2]
    geometric = [s for s in pil if isinstance(s, (T.Resize, T.CenterCrop))]
    other = [s for s in pil if not isinstance(s, (T.Resize, T.CenterCrop))]
    resize = next((s for s in pil if isinstance(s, T.Resize)), None)
    crop = next((s for s in pil if isinstance(s, T.CenterCrop)), None)
    known = (len(geometric) == len(pil) - len(other) and all(_is_rgb_step(s) for s in other)
             and resize is not None and (resize.max_size is None)
             and resize.interpolation in (T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC)
             and [type(s) for s in geometric] in ([T.Resize], [T.Resize, T.CenterCrop]))
    if not known:
        return T.Compose(pil), ImageSpec(mean, std)
    size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
    if isinstance(size, tuple) and len(size) == 1:
        size = size[0]
    return T.Compose(pil), ImageSpec(mean, std, size, tuple(crop.size) if crop is not None else None,
                                     resize.interpolation.value)


def _is_rgb_step(step) -> bool:
    """open_clip's conversion to RGB (``MaybeConvertMode('RGB')``, ``_convert_to_rgb`` in older releases).

    Harmless for device decoding: images are decoded as RGB there.
    """
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", "RGB") == "RGB"
    return getattr(step, "__name__", "") == "_convert_to_rgb"


def to_uint8(image) -> torch.Tensor:
    """A PIL RGB image -> ``uint8 [3, H, W]`` (what ``ToTensor`` would read, before scaling)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(x: torch.Tensor, spec: ImageSpec, dtype: torch.dtype) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` -> ``(x / 255 - mean) / std`` in float32, then ``dtype`` (ToTensor + Normalize)."""
    mean = torch.tensor(spec.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(3, 1, 1)
    return ((x.float() / 255 - mean) / std).to(dtype)


def read_jpeg(path) -> JpegBytes | None:
    """The bytes of a JPEG file after a cheap check that it decodes, or None for other formats.

    The check decodes at 1/8 scale (PIL's ``draft``: DC coefficients only, several times cheaper
    than a full decode), which still fails on a truncated or garbled file, so the engine's
    ``failed.parquet`` keeps catching bad files in the worker, before a batch reaches the GPU.
    """
    from PIL import Image

    path = _check_file(path)
    data = path.read_bytes()
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("RGB", "L"):
                return None  # CMYK/YCCK JPEGs: PIL converts them as the plain path does
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"undecodable image ({_reason(err, path)})") from None
    return JpegBytes(torch.frombuffer(bytearray(data), dtype=torch.uint8))


@functools.cache
def device_jpeg_decoder(device_type: str):
    """``torchvision.io.decode_jpeg`` if it decodes on ``device_type`` in this build, else None (detected by trying)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, format="JPEG")
        probe = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([probe], mode=ImageReadMode.RGB, device="cuda")
        if out[0].shape != (3, 16, 16):
            return None
    except Exception:  # no nvJPEG in this build, a CPU-only torchvision, ops that cannot load
        return None

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device="cuda")

    return decode


def resize_crop(img: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """``uint8 [3, H, W]`` on any device -> resized and centre-cropped uint8, torchvision's geometry, antialiased."""
    h, w = img.shape[-2:]
    if isinstance(spec.resize, int):
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        size = (new_short, new_long) if h <= w else (new_long, new_short)
    else:
        size = tuple(spec.resize)
    if size != (h, w):
        x = torch.nn.functional.interpolate(img[None].float(), size=size, mode=spec.interpolation,
                                            antialias=True, align_corners=False)
        img = x[0].round_().clamp_(0, 255).to(torch.uint8)
    if spec.crop is not None:
        ch, cw = spec.crop
        h, w = img.shape[-2:]
        if ch > h or cw > w:  # torchvision pads with zeros before cropping
            img = torch.nn.functional.pad(img, ((cw - w) // 2 if cw > w else 0, (cw - w + 1) // 2 if cw > w else 0,
                                                (ch - h) // 2 if ch > h else 0, (ch - h + 1) // 2 if ch > h else 0))
            h, w = img.shape[-2:]
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img[..., top:top + ch, left:left + cw]
    return img


def collate_images(items: list) -> dict:
    """Worker outputs (uint8 tensors, or ``JpegBytes``) -> ``{"pixels", "pixel_rows", "jpegs", "jpeg_rows"}``."""
    pixel_rows = [i for i, it in enumerate(items) if not isinstance(it, JpegBytes)]
    jpeg_rows = [i for i, it in enumerate(items) if isinstance(it, JpegBytes)]
    out = {"n": torch.tensor(len(items))}
    if pixel_rows:
        out["pixels"] = torch.stack([items[i] for i in pixel_rows])
        out["pixel_rows"] = torch.tensor(pixel_rows)
    if jpeg_rows:
        out["jpegs"] = HostList([items[i].data for i in jpeg_rows])
        out["jpeg_rows"] = jpeg_rows
    return out


def assemble(batch: dict, spec: ImageSpec, dtype: torch.dtype, device: torch.device, decoder=None) -> torch.Tensor:
    """A collated image batch on the device -> normalised ``[B, 3, H, W]`` in ``dtype``.

    JPEG bytes are decoded together by ``decoder`` (nvJPEG); if the batch call fails, each image is
    retried alone, and one that still fails is decoded by PIL here. An image nothing can decode
    becomes zeros, and its row and reason go to ``batch["failed_rows"]``, which the engine turns into
    a failure of that sample (never of the run).
    """
    if "jpegs" not in batch:
        return normalize(batch["pixels"], spec, dtype)
    datas, failed = batch["jpegs"].items, batch.setdefault("failed_rows", {})
    try:
        decoded = decoder(datas)
    except Exception:
        decoded = [_decode_one(d, decoder) for d in datas]
    shape = spec.crop or spec.resize
    images = []
    for row, img in zip(batch["jpeg_rows"], decoded):
        if isinstance(img, str):
            failed[row] = img
            images.append(torch.zeros((3, *shape), dtype=torch.uint8, device=device))
        else:
            images.append(resize_crop(img.to(device), spec))
    out = torch.empty((int(batch["n"]), *images[0].shape), dtype=torch.uint8, device=device)
    out[torch.tensor(batch["jpeg_rows"], device=device)] = torch.stack(images)
    if "pixels" in batch:
        out[batch["pixel_rows"].to(device)] = batch["pixels"]
    return normalize(out, spec, dtype)


def _decode_one(data: torch.Tensor, decoder):
    """One JPEG: nvJPEG, else PIL, else the reason (a str)."""
    try:
        return decoder([data])[0]
    except Exception:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return to_uint8(img)
        except (OSError, SyntaxError, ValueError) as err:
            return f"undecodable image ({type(err).__name__}: {str(err)[:150]})"


def device_decodable(spec: ImageSpec | None) -> bool:
    """Whether a spec fixes the output size (so decoded images stack): a centre crop, or a (h, w) resize."""
    return spec is not None and spec.resize is not None and (spec.crop is not None or isinstance(spec.resize, tuple))
