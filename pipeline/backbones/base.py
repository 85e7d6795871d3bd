"""What every backbone is: a frozen encoder loaded from local weights, split in two halves.

- ``Preprocessor`` (CPU, picklable, no model): turns one decoded input (PIL image, 16 kHz waveform,
  K video frames, text) into tensors, and collates a list of them into a batch. It runs in the
  DataLoader workers, so decoding and preprocessing overlap the model.
- ``Backbone`` (the model, on the device): declares which input kinds it encodes and the ``[T, D]``
  it produces for each, and maps a collated batch to ``[B, T, D]`` features plus per-sample extras.

A backbone is built from ``weights`` (a local file or folder, never a hub name) and a config dict
merged over the family's ``defaults``; the resolved config is recorded in the cache's meta.json.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from pipeline import images
from pipeline.decode import decode_source, load_image

_TORCHVISION_SHIM = []  # keeps the torch.library registration alive for the life of the process


class BackboneError(Exception):
    """Weights missing or in the wrong layout, a package not installed, a bad config. One clear line."""


def prepare_torchvision() -> None:
    """Make ``import torchvision`` work when its compiled ops cannot load (a CUDA build on CPU torch).

    torchvision registers fake kernels for ``torchvision::nms``/``qnms`` at import time, which fails
    if ``_C.so`` did not load. Defining the two schemas first lets the pure-Python parts (models,
    transforms) import; the compiled ops themselves stay unavailable, and nothing here uses them.
    Must run before the first import of torchvision, open_clip or a transformers vision model.
    """
    if "torchvision" in sys.modules or _TORCHVISION_SHIM:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C*.pyd"))
    try:
        torch.ops.load_library(libs[0])
        return
    except (IndexError, OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM.append(lib)


_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "orthogonal_", "constant_", "zeros_", "ones_")


@contextlib.contextmanager
def no_init(enabled: bool = True):
    """Module constructors skip their random initialisation inside this block (``torch.nn.init`` is a no-op).

    Why: a ViT-L/14 spends 6.5 s of a 2-core CPU drawing random weights that the checkpoint then
    overwrites (0.8 s without). Only for models loaded right after with a strict ``load_state_dict``,
    which fails if any weight is left unset.
    """
    if not enabled:
        yield
        return
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, func in saved.items():
            setattr(torch.nn.init, name, func)


def weights_path(weights, *, expect: str, what: str) -> Path:
    """Check that ``--weights`` exists and is what the family reads (``expect``: file, folder or any)."""
    if weights is None or str(weights) == "":
        raise BackboneError(f"--weights is required: {what}")
    path = Path(weights).expanduser()
    if not path.exists():
        raise BackboneError(f"weights not found: {path} (expected {what})")
    if expect == "folder" and not path.is_dir():
        raise BackboneError(f"weights {path} must be a folder: {what}")
    if expect == "file" and not path.is_file():
        raise BackboneError(f"weights {path} must be a file: {what}")
    return path.resolve()


# Messages of the errors torch.load, pickle and safetensors raise for a file that is cut short or is
# not a checkpoint at all, and the short reason a user reads instead.
_UNREADABLE = (
    ("PytorchStreamReader", "an incomplete zip archive: an interrupted download?"),
    ("central directory", "an incomplete zip archive: an interrupted download?"),
    ("Ran out of input", "it ends early"),
    ("invalid load key", "neither a torch zip archive nor a pickle"),
    ("deserializing header", "not a valid safetensors file"),
    ("HeaderTooLarge", "not a valid safetensors file"),
    ("MetadataIncompleteBuffer", "not a valid safetensors file: cut short?"),
)


def unreadable_weights(path, family: str, err: BaseException) -> BackboneError | None:
    """The one-line error for weights that cannot be read at all, or None when ``err`` is something else.

    Why: a half-finished download or a wrong file given as ``--weights`` otherwise ends in a
    50-line traceback from deep inside torch (``PytorchStreamReader failed reading zip archive``,
    or ``KeyError: 105`` from unpickling the first byte of a text file).
    """
    import pickle

    text = str(err)
    reason = next((why for key, why in _UNREADABLE if key in text or key in type(err).__name__), None)
    if reason is None and isinstance(err, (pickle.UnpicklingError, EOFError)):
        reason = "it ends early" if isinstance(err, EOFError) else "neither a torch zip archive nor a pickle"
    if reason is None and isinstance(err, KeyError) and err.args and isinstance(err.args[0], int):
        reason = "neither a torch zip archive nor a pickle"  # the unpickler read an opcode that is a text byte
    if reason is None:
        return None
    return BackboneError(f"cannot read weights {path}: the file is truncated or not a {family} checkpoint ({reason})")


def load_checkpoint(path: Path, family: str):
    """``torch.load`` of a local checkpoint (tensors only, memory-mapped); unreadable files: one ``BackboneError``."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # a legacy (non-zip) file cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, KeyError, UnpicklingError, EOFError... for a bad file
        raise (unreadable_weights(path, family, err) or BackboneError(
            f"cannot read weights {path} as a {family} checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''})")) from None


def resolve_config(family: str, defaults: dict, config: dict | None) -> dict:
    """Merge a user config over the family defaults; dict values (prompts) merge one level deep."""
    config = dict(config or {})
    unknown = set(config) - set(defaults)
    if unknown:
        raise BackboneError(f"unknown config key(s) for {family}: {sorted(unknown)}; known: {sorted(defaults)}")
    out = copy.deepcopy(defaults)
    for key, value in config.items():
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad 1-d token id tensors: the last position of every row is its last real token.

    ``position_ids`` count real tokens only, so a sample gets the same positions alone or in a
    batch with a longer one (and so the same hidden state at its last position).
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = s
        mask[i, n - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def last_valid(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, t_b]`` with ``t_b`` the last position where ``mask`` is set (left or right padding)."""
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def check_prompts(family: str, prompts: dict, kinds: tuple[str, ...], media_token: dict[str, str]) -> None:
    """Each kind needs a prompt; media prompts hold their token once, the text prompt holds ``{text}``."""
    for kind in kinds:
        message = prompts.get(kind)
        if not isinstance(message, str) or not message:
            raise BackboneError(f"{family}: no prompt for {kind}")
        token = media_token.get(kind, "{text}")
        if message.count(token) != 1:
            raise BackboneError(f"{family}: the {kind} prompt must contain {token} exactly once, got {message!r}")


def prompt_text(tokenizer, text: str, max_tokens: int, media_tokens) -> str:
    """A sample's text made safe for a prompt: media tokens defused, at most ``max_tokens`` tokens.

    A literal ``<image>`` in a tweet would otherwise make the model expect image features, and a
    long transcript would push the prompt past the context.
    """
    for token in media_tokens:
        text = text.replace(token, token.strip("<>"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


class Preprocessor(ABC):
    """The CPU half of a backbone; runs in DataLoader workers, so it must be picklable and model-free."""

    def load(self, kind: str, source, window, frames: int):
        """Read one source into what ``prepare`` takes (raises ``DecodeError``); images may stay JPEG bytes."""
        return decode_source(kind, source, window, frames)

    @abstractmethod
    def prepare(self, kind: str, decoded):
        """One decoded input (PIL image, list of PIL frames, float32 waveform, or str) -> tensors."""

    def collate(self, kind: str, items: list):
        """Stack per-sample tensors (override for variable-length inputs)."""
        if isinstance(items[0], dict):
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return torch.stack(items)


class ImagePrep:
    """The image half of a preprocessor, plain or fast (see ``pipeline/images.py``); picklable.

    Plain: the whole torchvision ``transform`` in the worker -> float32. Fast: its PIL steps in the
    worker -> uint8, normalisation on the device; with ``device_decode`` JPEGs travel as bytes.
    """

    def __init__(self, transform, fast: bool, device_decode: bool):
        self.transform = transform
        split = images.split_transform(transform) if fast else None
        self.pil, self.spec = split if split is not None else (None, None)
        self.device_decode = bool(device_decode and images.device_decodable(self.spec))

    @property
    def fast(self) -> bool:
        return self.pil is not None

    def load(self, source):
        return (self.device_decode and images.read_jpeg(source)) or load_image(source)

    def one(self, image):
        """One decoded image (PIL, or JPEG bytes kept for the device) -> a tensor or JpegBytes."""
        if isinstance(image, images.JpegBytes):
            return image
        return images.to_uint8(self.pil(image)) if self.fast else self.transform(image)

    def frames(self, frames) -> torch.Tensor:
        if self.fast:
            return torch.stack([images.to_uint8(self.pil(f)) for f in frames])
        return torch.stack([self.transform(f) for f in frames])

    def collate(self, items):
        return images.collate_images(items) if self.fast else torch.stack(items)


def device_pixels(prep: ImagePrep, batch, dtype: torch.dtype, device: torch.device, decoder=None) -> torch.Tensor:
    """The device half of ``ImagePrep``: a collated batch on the device -> normalised pixels in ``dtype``.

    Plain batches are already normalised float32 (the engine's autocast casts them); fast image
    batches are ``collate_images`` dicts, fast video batches uint8 ``[B, K, 3, H, W]``.
    """
    if isinstance(batch, dict):
        return images.assemble(batch, prep.spec, dtype, device, decoder)
    if batch.dtype == torch.uint8:
        return images.normalize(batch, prep.spec, dtype)
    return batch


class Backbone(ABC):
    """A frozen encoder. Subclasses set ``family``, ``kinds``, ``defaults`` and implement the methods.

    ``fast`` (the default): the weights themselves are cast to the compute dtype the way the
    library does it (open_clip's ``precision``, LayerNorm kept float32 where the library keeps it),
    images reach the device as uint8 and are normalised there, LLMs use SDPA attention and text
    prompts are batched by length. ``fast=False`` is the plain path kept for comparison: float32
    weights under autocast (except ``half_weights``: the 7B LLMs are always loaded in the compute
    dtype), the whole preprocessing in the workers. ``image_decode``: ``cpu`` (PIL in the workers),
    ``device`` (nvJPEG where this build has it, else PIL) or ``auto`` (device on CUDA when nvJPEG works).
    """

    family: str = ""
    kinds: tuple[str, ...] = ()
    weights_layout: str = ""  # what --weights must be, for messages and `cli.py backbones`
    defaults: dict = {}
    half_weights: bool = False
    bucket_text: bool = False  # an LLM: text prompts of similar length are batched together on the fast path

    def __init__(self, weights, config: dict | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, fast: bool = True, image_decode: str = "auto"):
        self.config = resolve_config(self.family, self.defaults, config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.fast = fast
        if image_decode not in ("auto", "cpu", "device"):
            raise BackboneError(f"image decoding must be auto, cpu or device, got {image_decode!r}")
        # Looked up on the module at each build, so that a test can stand in a decoder for nvJPEG.
        self.jpeg_decoder = images.device_jpeg_decoder(self.device.type) if fast and image_decode != "cpu" else None
        if image_decode == "device" and self.jpeg_decoder is None:
            self.image_decode = "cpu"  # asked for, but this build/device cannot: PIL in the workers
        else:
            self.image_decode = "device" if self.jpeg_decoder is not None else "cpu"
        self.info: dict = {}  # facts found while loading (dims, token ids), recorded in meta.json
        self.load(weights)

    @property
    def autocast(self) -> bool:
        """Whether the engine runs ``encode`` under autocast: the plain path with a reduced compute dtype."""
        return not self.fast and self.dtype != torch.float32

    @classmethod
    def import_libraries(cls) -> None:
        """Import the family's libraries (open_clip, whisper, transformers...); timed apart at start-up."""

    @abstractmethod
    def load(self, weights) -> None:
        """Load the model from the local ``weights`` path onto ``self.device``; set ``self.info``."""

    @abstractmethod
    def preprocessor(self) -> Preprocessor:
        """The worker-side half (transforms, tokenizer, feature extractor)."""

    @classmethod
    def tokens(cls, kind: str, frames):
        """``T`` of one sample of ``kind``: one vector per video frame (``frames`` = K), else one."""
        return frames if kind == "video" else 1

    def output_shape(self, kind: str, frames: int) -> tuple[int, int]:
        """``(T, D)`` of the features of one sample of ``kind`` (``self.dim`` is set by ``load``)."""
        return self.tokens(kind, frames), self.dim

    @abstractmethod
    def encode(self, kind: str, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A collated batch (already on the device) -> ``[B, T, D]`` features and ``{extra: [B]}``."""

    def extras(self, kind: str) -> dict[str, str]:
        """Per-sample extras ``encode`` returns for ``kind``, name -> numpy dtype (whisper: ``n_valid``)."""
        return {}

    def record(self) -> dict:
        """What meta.json keeps about this backbone: family, resolved config, load-time facts."""
        return {"family": self.family, **self.config, "info": self.info}

    def runtime(self) -> dict:
        """How this run computed (recorded in meta.json, not compared on resume): path, weights' dtype, decoding."""
        weights = self.dtype if self.fast or self.half_weights else torch.float32
        return {"path": "fast" if self.fast else "plain", "image_decode": self.image_decode,
                "weights_dtype": str(weights).replace("torch.", "")}

