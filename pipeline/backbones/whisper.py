"""Whisper's audio encoder (openai-whisper, large-v3 by default): one vector per clip.

Weights: an openai-whisper checkpoint file (``large-v3.pt``: ``dims`` + ``model_state_dict``);
only the encoder is built and loaded. The encoder takes exactly 30 s (3000 mel frames, 1500 output
frames of 20 ms), so a clip is cut into 30 s chunks, each padded; the feature is the mean over the
*valid* output frames only (``n_valid = ceil(floor(samples / 160) / 2)`` per chunk), never over the
padding, which would otherwise dominate short clips. ``n_valid`` (summed over chunks) is stored
as a per-sample extra. Clips longer than ``max_chunks`` x 30 s are cut there.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.backbones.base import Backbone, BackboneError, Preprocessor, load_checkpoint, weights_path

SAMPLE_RATE = 16000
CHUNK = 30 * SAMPLE_RATE  # samples per encoder window
HOP = 160
FRAMES_OUT = 1500  # encoder output frames per window


def valid_frames(n_samples: int) -> int:
    """Encoder output frames that hold audio for a chunk of ``n_samples`` (the rest is padding)."""
    return max(1, min(FRAMES_OUT, math.ceil((n_samples // HOP) / 2)))


class WhisperPreprocessor(Preprocessor):
    def __init__(self, n_mels: int, max_chunks: int):
        self.n_mels = n_mels
        self.max_chunks = max_chunks

    def prepare(self, kind, decoded: np.ndarray):
        from whisper.audio import log_mel_spectrogram, pad_or_trim

        wav = torch.from_numpy(np.ascontiguousarray(decoded[: CHUNK * self.max_chunks], dtype=np.float32))
        chunks = list(wav.split(CHUNK))
        mels = torch.stack([log_mel_spectrogram(pad_or_trim(c), n_mels=self.n_mels) for c in chunks])
        valid = torch.tensor([valid_frames(len(c)) for c in chunks], dtype=torch.long)
        return {"mel": mels, "valid": valid}  # mel [chunks, n_mels, 3000]

    def collate(self, kind, items):
        return {
            "mel": torch.cat([it["mel"] for it in items]),
            "valid": torch.cat([it["valid"] for it in items]),
            "owner": torch.cat([torch.full((len(it["valid"]),), i, dtype=torch.long) for i, it in enumerate(items)]),
            "size": torch.tensor(len(items)),
        }


class WhisperBackbone(Backbone):
    family = "whisper"
    kinds = ("audio",)
    weights_layout = "an openai-whisper checkpoint file such as large-v3.pt"
    defaults = {"max_chunks": 20}

    def load(self, weights):
        path = weights_path(weights, expect="file", what=self.weights_layout)
        from whisper.model import AudioEncoder, ModelDimensions

        ckpt = load_checkpoint(path, self.family)
        try:
            dims = ModelDimensions(**ckpt["dims"])
            state = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}
        except (RuntimeError, KeyError, TypeError, OSError) as err:
            raise BackboneError(f"{path} is not an openai-whisper checkpoint ({type(err).__name__}: {err})") from None
        if dims.n_audio_ctx != FRAMES_OUT:
            raise BackboneError(f"{path}: n_audio_ctx is {dims.n_audio_ctx}, the 30 s windows need {FRAMES_OUT}")
        encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise BackboneError(f"{path}: encoder weights do not fit ({str(err).splitlines()[0][:300]})") from None
        self.model = encoder.to(self.device).eval().requires_grad_(False)
        self.n_mels, self.dim = dims.n_mels, dims.n_audio_state
        self.info = {"weights": str(path), "dim": self.dim, "n_mels": self.n_mels, "layers": dims.n_audio_layer}

    def preprocessor(self):
        return WhisperPreprocessor(self.n_mels, self.config["max_chunks"])

    def extras(self, kind):
        return {"n_valid": "int64"}

    def encode(self, kind, batch):
        h = self.model(batch["mel"]).float()  # [chunks, 1500, D]
        valid = batch["valid"]
        mask = torch.arange(h.shape[1], device=h.device)[None, :] < valid[:, None]
        sums = (h * mask[..., None]).sum(1)  # [chunks, D]
        b = int(batch["size"])
        pooled = torch.zeros(b, h.shape[-1], device=h.device).index_add_(0, batch["owner"], sums)
        n_valid = torch.zeros(b, dtype=torch.long, device=h.device).index_add_(0, batch["owner"], valid)
        return (pooled / n_valid[:, None])[:, None], {"n_valid": n_valid}
