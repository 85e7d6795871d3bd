"""LLaVA-1.5 (transformers) as an encoder: the last layer's hidden state at a ``[CLASS]`` suffix.

Weights: a folder in the ``llava-hf/llava-1.5-7b-hf`` layout (config.json, safetensors shards,
tokenizer and processor files), downloaded beforehand.

Each modality of a sample gets its own prompt (the MLLM setting of the EDM paper): the message for
its kind (``prompts``; ``<image>`` marks the image, ``{text}`` the sample's text) is put into
``template``, followed by ``class_token`` (``[CLASS]``); the feature is the last layer's hidden state at the last
real token. Prompts are left-padded with position ids counting real tokens only, so a sample's
vector does not depend on what it is batched with. Video: each of the K frames is its own image
prompt, giving ``[K, D]``.

Fast path: PyTorch SDPA attention (``attn_implementation="sdpa"``), the processor's resize and crop
in the workers with pixels shipped as uint8 and normalised on the device, text prompts batched by
length. The weights are in the compute dtype on both paths (a 7B model would not fit otherwise).
"""
from __future__ import annotations

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
from pipeline.images import ImageSpec, normalize


class LlavaPreprocessor(Preprocessor):
    def __init__(self, processor, template: str, class_token: str, prompts: dict, max_text_tokens: int,
                 fast: bool = False):
        self.processor = processor
        self.fast = fast
        self.template = template
        self.class_token = class_token
        self.prompts = prompts
        self.max_text_tokens = max_text_tokens
        self.pad_id = processor.tokenizer.pad_token_id or 0

    def prompt(self, kind: str, text: str | None = None) -> str:
        message = self.prompts[kind]
        if text is not None:
            message = message.replace("{text}", text)
        return f"{self.template.replace('{message}', message)} {self.class_token}"

    def _image(self, kind, image):
        if self.fast:  # resize + crop only: uint8 to the device, rescale and normalise there
            enc = self.processor(text=self.prompt(kind), images=image, return_tensors="pt", do_rescale=False,
                                 do_normalize=False)
            return enc["input_ids"][0], enc["pixel_values"][0].round().clamp(0, 255).to(torch.uint8)
        enc = self.processor(text=self.prompt(kind), images=image, return_tensors="pt")
        return enc["input_ids"][0], enc["pixel_values"][0]

    def prepare(self, kind, decoded):
        if kind == "text":
            tok = self.processor.tokenizer
            text = prompt_text(tok, decoded, self.max_text_tokens, [self.processor.image_token])
            return {"input_ids": tok(self.prompt("text", text), return_tensors="pt")["input_ids"][0]}
        frames = decoded if kind == "video" else [decoded]
        ids, pixels = zip(*(self._image(kind, f) for f in frames))
        return {"input_ids": list(ids), "pixel_values": torch.stack(pixels)}

    def collate(self, kind, items):
        if kind == "text":
            return left_pad([it["input_ids"] for it in items], self.pad_id)
        batch = left_pad([ids for it in items for ids in it["input_ids"]], self.pad_id)
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["frames"] = torch.tensor(len(items[0]["input_ids"]))
        return batch


class LlavaBackbone(Backbone):
    family = "llava"
    kinds = ("image", "video", "text")
    weights_layout = "a llava-hf model folder (config.json, safetensors, tokenizer and processor files)"
    half_weights = True
    bucket_text = True
    defaults = {
        "template": "USER: {message} ASSISTANT:",
        "class_token": "[CLASS]",
        "prompts": {
            "image": "<image>\nDescribe the image in one word.",
            "video": "<image>\nDescribe this video frame in one word.",
            "text": "{text}\nDescribe the text in one word.",
        },
        "max_text_tokens": 256,
    }

    @classmethod
    def import_libraries(cls):
        prepare_torchvision()
        import transformers  # noqa: F401
        from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401

    def load(self, weights):
        path = weights_path(weights, expect="folder", what=self.weights_layout)
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path} has no config.json: expected the llava-hf/llava-1.5-7b-hf folder layout")
        if "{message}" not in self.config["template"]:
            raise BackboneError(f"llava: template must contain {{message}}, got {self.config['template']!r}")
        prepare_torchvision()
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = self.load_model(path, {"attn_implementation": "sdpa" if self.fast else "eager"})
        except (OSError, ValueError) as err:
            raise BackboneError(f"cannot load LLaVA from {path}: {str(err).splitlines()[0][:300]}") from None
        check_prompts("llava", self.config["prompts"], self.kinds,
                      {"image": processor.image_token, "video": processor.image_token})
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._pre = LlavaPreprocessor(processor, self.config["template"], self.config["class_token"],
                                      self.config["prompts"], self.config["max_text_tokens"], self.fast)
        self.spec = None
        if self.fast:
            ip = processor.image_processor
            self.spec = ImageSpec(tuple(ip.image_mean), tuple(ip.image_std))
        self.dim = model.config.text_config.hidden_size
        self.info = {
            "weights": str(path), "dim": self.dim, "layers": model.config.text_config.num_hidden_layers,
            "class_token_ids": processor.tokenizer(self.config["class_token"], add_special_tokens=False)["input_ids"],
            "prompts_resolved": {k: self._pre.prompt(k) for k in self.kinds},
        }

    def load_model(self, path, options: dict):
        """The model from the folder's weights (``bench_extract_gpu.py`` builds it from the config instead)."""
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=self.dtype, **options)

    def preprocessor(self):
        return self._pre

    def encode(self, kind, batch):
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            pixels = normalize(pixels, self.spec, self.model.dtype)
        out = self.model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            pixel_values=None if pixels is None else pixels.to(self.model.dtype), use_cache=False,
        )
        h = last_valid(out.last_hidden_state, batch["attention_mask"])
        if kind == "video":
            return h.view(-1, int(batch["frames"]), h.shape[-1]), {}
        return h[:, None], {}
