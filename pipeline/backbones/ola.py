"""Ola-7B (omni-modal: image, video, speech, text) as an encoder, through the ``ola`` package.

Plain transformers cannot load model_type ``ola_qwen``: the ``ola`` package from the Ola-Omni/Ola
repository must be installed (it pins its own torch/transformers, so usually a separate
environment: README, "Ola-7B"). It is imported only when this backbone is built; without it (or
without ``flash_attn`` and ``deepspeed``, which Ola's vision tower imports) the run stops with one
line naming the install.

Weights: the Ola-7b checkpoint folder (config.json, weights, tokenizer). Loading follows Ola's
``load_pretrained_model`` step by step (the LLM with its vision tower, then the speech encoders
rebuilt from their own checkpoints, the embeddings resized to the tokenizer) but on the device this
run uses, where Ola's own loader hard-codes ``cuda``. The config names the speech encoders
(``large-v3.pt``, BEATs) by paths that may be relative to that folder; they are resolved against
it. The vision tower asks the Hugging Face cache for ``CLIPImageProcessor`` of
``openai/clip-vit-large-patch14``; offline without that cache it gets the same processor built from
that checkpoint's published preprocessing values (Ola then sets mean = std = 0.5, and extraction
turns resizing and cropping off, so only the rescale and normalisation matter).

As for LLaVA, each modality gets its own prompt: the message for its kind (``<image>``,
``<speech>``, ``{text}``) in Ola's ``qwen_1_5`` chat template, followed by ``[CLASS]``; the feature
is the last layer's hidden state at the last valid position (Ola re-pads the sequence after
inserting modality embeddings, so the position is read from the returned mask). Ola always runs
both encoders: the modality a prompt does not use gets Ola's own zero dummy.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import numpy as np
import torch

from pipeline.backbones.base import (
    Backbone,
    BackboneError,
    Preprocessor,
    check_prompts,
    last_valid,
    left_pad,
    prepare_torchvision,
    prompt_text,
    weights_path,
)

INSTALL = ("the ola7b backbone needs the `ola` package: pip install git+https://github.com/Ola-Omni/Ola.git "
           "(in its own environment: it pins torch 2.1.2, transformers 4.43.4; see the README, \"Ola-7B\")")
# What Ola's vision tower imports besides the package's own requirements (its `[train]` extra, flash-attn).
INSTALL_VISION = ("Ola's vision tower imports {name}: in Ola's environment, pip install -e '.[train]' (deepspeed) and "
                  "pip install flash-attn --no-build-isolation (needs CUDA); see the README, \"Ola-7B\"")
# openai/clip-vit-large-patch14's preprocessor_config.json, for offline runs without that hub cache.
CLIP_L14_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 224,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# Read by the ola package at import time; these are the values of Ola's own inference script.
OLA_ENV = {
    "LOWRES_RESIZE": "384x32", "HIGHRES_BASE": "0x32", "MAXRES": "1536", "MINRES": "0",
    "VIDEO_RESIZE": "0x64", "VIDEO_MAXRES": "480", "VIDEO_MINRES": "288",
    "FORCE_NO_DOWNSAMPLE": "1", "LOAD_VISION_EARLY": "1", "PAD2STRIDE": "1",
}
CHUNK, MAX_CHUNKS, PAD_ID = 480000, 25, 151643  # 30 s speech chunks, at most 25 of them; Qwen2's pad


@functools.cache
def _import_ola():
    if importlib.util.find_spec("ola") is None:
        raise BackboneError(INSTALL)
    for key, value in OLA_ENV.items():
        os.environ.setdefault(key, value)
    prepare_torchvision()
    try:
        import ola.constants
        import ola.conversation
        import ola.datasets.preprocess
        import ola.mm_utils
        import ola.model.multimodal_encoder.oryx_vit  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name in ("flash_attn", "deepspeed"):
            raise BackboneError(INSTALL_VISION.format(name=err.name)) from None
        raise
    return ola


@contextlib.contextmanager
def _in_folder(path):
    """``contextlib.chdir`` (Python 3.11+) for Ola's Python 3.10."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _clip_processor_offline():
    """Ola's vision tower gets CLIP-L/14's image processor even without that hub cache (see the module doc)."""
    import ola.model.multimodal_encoder.oryx_vit as oryx

    real = oryx.CLIPImageProcessor

    class Processor(real):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            try:
                return real.from_pretrained(name, *args, **kwargs)
            except OSError:  # not in the cache, and offline
                if name != "openai/clip-vit-large-patch14":
                    raise
                return real(**CLIP_L14_PREPROCESSOR)

    oryx.CLIPImageProcessor = Processor
    try:
        yield
    finally:
        oryx.CLIPImageProcessor = real


class OlaPreprocessor(Preprocessor):
    def __init__(self, tokenizer, image_processor, conv_mode: str, class_token: str, prompts: dict,
                 max_text_tokens: int):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.class_token = class_token
        self.prompts = prompts
        self.max_text_tokens = max_text_tokens

    def prompt(self, kind: str, text: str | None = None) -> str:
        ola = _import_ola()
        message = self.prompts[kind] if text is None else self.prompts[kind].replace("{text}", text)
        conv = ola.conversation.conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], message)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt() + self.class_token

    def prepare(self, kind, decoded):
        ola = _import_ola()
        pre, consts = ola.datasets.preprocess, ola.constants
        if kind == "audio":
            ids = pre.tokenizer_speech_token(self.prompt(kind), self.tokenizer, consts.SPEECH_TOKEN_INDEX,
                                             return_tensors="pt")
            return {"input_ids": ids, **self._speech(decoded)}
        if kind == "text":
            text = prompt_text(self.tokenizer, decoded, self.max_text_tokens,
                               [consts.DEFAULT_IMAGE_TOKEN, consts.DEFAULT_SPEECH_TOKEN])
            return {"input_ids": pre.tokenizer_image_token(self.prompt(kind, text), self.tokenizer,
                                                           consts.IMAGE_TOKEN_INDEX, return_tensors="pt")}
        ids = pre.tokenizer_image_token(self.prompt(kind), self.tokenizer, consts.IMAGE_TOKEN_INDEX,
                                        return_tensors="pt")
        if kind == "video":
            frames = torch.stack([ola.mm_utils.process_anyres_video(f, self.image_processor) for f in decoded])
            return {"input_ids": ids, "image": frames, "image_highres": frames, "size": decoded[0].size}
        image, highres = ola.mm_utils.process_anyres_highres_image(decoded, self.image_processor)
        return {"input_ids": ids, "image": image, "image_highres": highres, "size": decoded.size}

    @staticmethod
    def _speech(wav: np.ndarray) -> dict:
        """Ola's speech input: 30 s chunks (at most 25), 128-bin log-mel [chunks, 3000, 128] plus raw wav."""
        from whisper.audio import log_mel_spectrogram, pad_or_trim

        chunks = [pad_or_trim(torch.from_numpy(c)) for c in np.split(wav, range(CHUNK, len(wav), CHUNK))][:MAX_CHUNKS]
        mels = torch.stack([log_mel_spectrogram(c, n_mels=128).permute(1, 0) for c in chunks])
        return {"speech": mels, "speech_lengths": torch.full((len(chunks),), mels.shape[1], dtype=torch.long),
                "speech_chunks": torch.tensor([len(chunks)]), "speech_wav": torch.stack(chunks)}

    def collate(self, kind, items):
        batch = left_pad([it["input_ids"] for it in items], self.pad_id)
        for key in ("image", "image_highres", "size", "speech", "speech_lengths", "speech_chunks", "speech_wav"):
            if key in items[0]:
                batch[key] = [it[key] for it in items]
        return batch


class OlaBackbone(Backbone):
    family = "ola"
    kinds = ("image", "video", "audio", "text")
    weights_layout = "the Ola-7b checkpoint folder (needs the ola package, flash-attn and so a CUDA GPU)"
    half_weights = True
    bucket_text = True
    defaults = {
        "conv_mode": "qwen_1_5",
        "class_token": "[CLASS]",
        "prompts": {
            "image": "<image>\nDescribe the image in one word.",
            "video": "<image>\nDescribe the video in one word.",
            "audio": "<speech>\nDescribe the audio in one word.",
            "text": "{text}\nDescribe the text in one word.",
        },
        "max_text_tokens": 256,
    }

    @classmethod
    def import_libraries(cls):
        _import_ola()

    def load(self, weights):
        ola = _import_ola()
        path = weights_path(weights, expect="folder", what=self.weights_layout)
        consts = ola.constants
        image, speech = consts.DEFAULT_IMAGE_TOKEN, consts.DEFAULT_SPEECH_TOKEN
        check_prompts("ola", self.config["prompts"], self.kinds, {"image": image, "video": image, "audio": speech})
        tokenizer, model, image_processor = self.load_model(path)
        image_processor.do_resize = False  # Ola's anyres processing resizes by itself
        image_processor.do_center_crop = False
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self._pre = OlaPreprocessor(tokenizer, image_processor, self.config["conv_mode"], self.config["class_token"],
                                    self.config["prompts"], self.config["max_text_tokens"])
        self.dim = model.config.hidden_size
        self.info = {
            "weights": str(path), "dim": self.dim, "layers": model.config.num_hidden_layers,
            "class_token_ids": tokenizer(self.config["class_token"], add_special_tokens=False)["input_ids"],
            "prompts_resolved": {k: self._pre.prompt(k) for k in self.kinds},
        }

    def load_model(self, path):
        """Ola's ``load_pretrained_model`` (no LoRA, no base model, no quantisation) on ``self.device``."""
        from transformers import AutoTokenizer

        from ola.model import OlaQwenForCausalLM
        from ola.model.speech_encoder.builder import build_speech_encoder

        options = {"attn_implementation": "sdpa"} if self.fast else {}  # plain: Ola's own choice
        try:
            with _in_folder(path), _clip_processor_offline():  # the config's encoder paths may be relative
                tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
                model = OlaQwenForCausalLM.from_pretrained(path, low_cpu_mem_usage=False, torch_dtype=self.dtype,
                                                           **options)
                model.get_model().speech_encoder = build_speech_encoder(model.config)
                model.resize_token_embeddings(len(tokenizer))
                vision_tower = model.get_vision_tower()
                if not vision_tower.is_loaded:
                    vision_tower.load_model(device_map=str(self.device))
        except (OSError, ValueError) as err:
            raise BackboneError(f"cannot load Ola from {path}: {str(err).splitlines()[0][:300]}") from None
        return tokenizer, model, vision_tower.image_processor

    def preprocessor(self):
        return self._pre

    @classmethod
    def tokens(cls, kind, frames):
        return 1  # one [CLASS] vector per sample, whatever the input

    def _dummies(self, n: int) -> dict:
        """Ola's zero inputs for the encoder a prompt does not use (both encoders always run)."""
        dev, dt = self.device, self.dtype
        return {
            "image": [torch.zeros(1, 3, 224, 224, device=dev, dtype=dt)] * n,
            "image_highres": [torch.zeros(1, 3, 224, 224, device=dev, dtype=dt)] * n,
            "size": [(224, 224)] * n,
            "speech": [torch.zeros(1, 3000, 128, device=dev, dtype=dt)] * n,
            "speech_lengths": [torch.tensor([3000], device=dev)] * n,
            "speech_chunks": [torch.tensor([1], device=dev)] * n,
            "speech_wav": [torch.zeros(1, CHUNK, device=dev)] * n,
        }

    def encode(self, kind, batch):
        ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        lm = self.model.get_model()
        if kind == "text":  # no modality token: Ola's embedding is the token embedding alone
            embeds = lm.embed_tokens(ids)
        else:
            inputs = {**self._dummies(len(ids)), **{k: v for k, v in batch.items() if k not in ("input_ids",
                      "attention_mask", "position_ids")}}
            for key in ("speech", "image", "image_highres"):  # the raw wav stays float32, as in Ola
                inputs[key] = [x.to(self.dtype) for x in inputs[key]]
            _, positions, mask, _, embeds, _ = self.model.prepare_inputs_labels_for_speech_vision_text(
                ids, positions, mask, None, None,
                inputs["speech"], inputs["speech_lengths"], inputs["speech_chunks"], inputs["speech_wav"],
                inputs["image"], [kind if kind != "audio" else "text"] * len(ids), inputs["size"],
                inputs["image_highres"],
            )
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        return last_valid(out.last_hidden_state, mask)[:, None], {}
