"""Whisper's audio encoder (openai-whisper, large-v3 by default): one vector per clip.

Weights: an openai-whisper checkpoint file (``large-v3.pt``: ``dims`` + ``model_state_dict``);
only the encoder is built and loaded. The encoder takes exactly 30 s (3000 mel frames, 1500 output
frames of 20 ms), so a clip is cut into 30 s chunks, each padded; the feature is the mean over the
*valid* output frames only (``n_valid = ceil(floor(samples / 160) / 2)`` per chunk), never over the
padding, which would otherwise dominate short clips. ``n_valid`` (summed over chunks) is stored
as a per-sample extra. Clips longer than ``max_chunks`` x 30 s are cut there.

Fast path: Linear/Conv weights in the compute dtype, LayerNorm and the positional embedding kept
float32 (whisper's LayerNorm computes in float32 and casts back; the embedding is added, then cast),
log-mel computed in the workers as before.

``window: "valid"`` (opt-in; ``--whisper-window valid``) **changes the features**: instead of a 30 s
window padded with silence, each chunk is encoded over its valid frames only (the positional
embedding sliced to them, attention masked to them, so a clip gets the same vector alone or in a
batch). Whisper was trained on 30 s windows, so the vectors move (the GPU benchmark measures how
far); a 3 s clip costs about a tenth of the compute. The log-mel frames themselves are those of
the 30 s window (the clip is zero-padded as whisper pads it). Caches made with one window are never
resumed with the other.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.backbones.base import Backbone, BackboneError, Preprocessor, load_checkpoint, no_init, weights_path

SAMPLE_RATE = 16000
CHUNK = 30 * SAMPLE_RATE  # samples per encoder window
HOP = 160
FRAMES_OUT = 1500  # encoder output frames per window


def valid_frames(n_samples: int) -> int:
    """Encoder output frames that hold audio for a chunk of ``n_samples`` (the rest is padding)."""
    return max(1, min(FRAMES_OUT, math.ceil((n_samples // HOP) / 2)))


def valid_mel(chunk: torch.Tensor, n_mels: int) -> torch.Tensor:
    """The first ``2 * valid_frames`` log-mel frames of ``chunk``'s 30 s window, computed on the clip alone.

    The clip is zero-padded by a few hops (as ``pad_or_trim`` pads it with zeros to 30 s), so the
    frames near its end see the same zeros; the log-mel's floor (max - 8) comes from the loud part,
    which both see. Equal to ``log_mel_spectrogram(pad_or_trim(chunk))[:, :2 * valid_frames]``
    except for a clip that is silence throughout (tested).
    """
    from whisper.audio import log_mel_spectrogram

    frames = 2 * valid_frames(len(chunk))
    padded = torch.nn.functional.pad(chunk, (0, (frames + 2) * HOP - len(chunk)))
    return log_mel_spectrogram(padded, n_mels=n_mels)[:, :frames]


class WhisperPreprocessor(Preprocessor):
    def __init__(self, n_mels: int, max_chunks: int, window: str = "30s"):
        self.n_mels = n_mels
        self.max_chunks = max_chunks
        self.window = window

    def prepare(self, kind, decoded: np.ndarray):
        from whisper.audio import log_mel_spectrogram, pad_or_trim

        wav = torch.from_numpy(np.ascontiguousarray(decoded[: CHUNK * self.max_chunks], dtype=np.float32))
        chunks = list(wav.split(CHUNK))
        valid = torch.tensor([valid_frames(len(c)) for c in chunks], dtype=torch.long)
        if self.window == "valid":
            return {"mels": [valid_mel(c, self.n_mels) for c in chunks], "valid": valid}
        mels = torch.stack([log_mel_spectrogram(pad_or_trim(c), n_mels=self.n_mels) for c in chunks])
        return {"mel": mels, "valid": valid}  # mel [chunks, n_mels, 3000]

    def collate(self, kind, items):
        out = {
            "valid": torch.cat([it["valid"] for it in items]),
            "owner": torch.cat([torch.full((len(it["valid"]),), i, dtype=torch.long) for i, it in enumerate(items)]),
            "size": torch.tensor(len(items)),
        }
        if self.window == "valid":  # zero-padded to the longest chunk of the batch; the encoder masks the rest
            mels = [m for it in items for m in it["mels"]]
            frames = max(m.shape[1] for m in mels)
            out["mel"] = torch.stack([torch.nn.functional.pad(m, (0, frames - m.shape[1])) for m in mels])
        else:
            out["mel"] = torch.cat([it["mel"] for it in items])
        return out


def encode_valid(encoder, mel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """openai-whisper's ``AudioEncoder`` over the first ``valid[i]`` output frames of each row only.

    ``AudioEncoder.forward`` asserts a 30 s input; this runs its own modules instead: the two
    convolutions (the first one's output zeroed past each row's own mel frames, so the second sees
    what zero padding would give it alone), the positional embedding sliced to the frames present,
    and each block with a key mask (SDPA) so padded frames are never attended to.
    """
    import torch.nn.functional as F

    dtype = encoder.conv1.weight.dtype
    x = F.gelu(encoder.conv1(mel.to(dtype)))
    frames = torch.arange(x.shape[-1], device=x.device)
    x = x * (frames[None, :] < 2 * valid[:, None])[:, None, :].to(x.dtype)
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    n = x.shape[1]
    x = (x + encoder.positional_embedding[:n]).to(x.dtype)
    keep = torch.arange(n, device=x.device)[None, :] < valid[:, None]  # [B, n]
    mask = keep[:, None, None, :]
    for block in encoder.blocks:
        attn, h = block.attn, block.attn_ln(x)
        b, t, c = h.shape
        q, k, v = (lin(h).view(b, t, attn.n_head, c // attn.n_head).transpose(1, 2)
                   for lin in (attn.query, attn.key, attn.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.out(a.transpose(1, 2).reshape(b, t, c))
        x = x + block.mlp(block.mlp_ln(x))
    return encoder.ln_post(x)


def cast_weights(encoder, dtype: torch.dtype):
    """Linear/Conv weights to ``dtype``; whisper's LayerNorms and the positional embedding stay float32."""
    from whisper.model import LayerNorm

    for module in encoder.modules():
        if isinstance(module, LayerNorm):
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)
    return encoder


class WhisperBackbone(Backbone):
    family = "whisper"
    kinds = ("audio",)
    weights_layout = "an openai-whisper checkpoint file such as large-v3.pt"
    defaults = {"max_chunks": 20, "window": "30s"}

    @classmethod
    def import_libraries(cls):
        import whisper.audio  # noqa: F401
        import whisper.model  # noqa: F401

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
        if self.config["window"] not in ("30s", "valid"):
            raise BackboneError(f"whisper: window must be 30s or valid, got {self.config['window']!r}")
        with torch.device(self.device), no_init(self.fast):  # built on the device, then the checkpoint (strict)
            encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                   dims.n_audio_layer)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise BackboneError(f"{path}: encoder weights do not fit ({str(err).splitlines()[0][:300]})") from None
        if self.fast:
            cast_weights(encoder, self.dtype)
        self.model = encoder.to(self.device).eval().requires_grad_(False)
        self.n_mels, self.dim = dims.n_mels, dims.n_audio_state
        self.info = {"weights": str(path), "dim": self.dim, "n_mels": self.n_mels, "layers": dims.n_audio_layer}

    def preprocessor(self):
        return WhisperPreprocessor(self.n_mels, self.config["max_chunks"], self.config["window"])

    def extras(self, kind):
        return {"n_valid": "int64"}

    def encode(self, kind, batch):
        valid = batch["valid"]
        if self.config["window"] == "valid":
            h = encode_valid(self.model, batch["mel"], valid).float()  # [chunks, longest valid, D]
        else:
            h = self.model(batch["mel"].to(self.model.conv1.weight.dtype)).float()  # [chunks, 1500, D]
        mask = torch.arange(h.shape[1], device=h.device)[None, :] < valid[:, None]
        sums = (h * mask[..., None]).sum(1)  # [chunks, D]
        b = int(batch["size"])
        pooled = torch.zeros(b, h.shape[-1], device=h.device).index_add_(0, batch["owner"], sums)
        n_valid = torch.zeros(b, dtype=torch.long, device=h.device).index_add_(0, batch["owner"], valid)
        return (pooled / n_valid[:, None])[:, None], {"n_valid": n_valid}
