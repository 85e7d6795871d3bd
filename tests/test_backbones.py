"""Every backbone family, tiny and random, built through its real loading path from files on disk.

No weights exist on the test machines: each ``tiny_*`` helper writes a randomly initialised model in
the layout users download (open_clip folder, whisper .pt, torchvision .pth, llava-hf folder), and
the backbone loads it exactly as it would load the real one. ``tests/test_extract.py`` reuses them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import BACKBONES, BackboneError, build_backbone, prepare_torchvision
from pipeline.backbones.base import left_pad
from pipeline.backbones.whisper import valid_frames

TINY_RESNET = {"layers": [1, 1, 1, 1], "image_size": 32}


def tiny_clip(folder: Path) -> Path:
    """An open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin) with a tiny ViT."""
    prepare_torchvision()
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(open_clip.CLIP(**cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def tiny_resnet(file: Path) -> Path:
    """A torchvision state-dict file of a ResNet-18 with one block per stage."""
    prepare_torchvision()
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ResNet(BasicBlock, TINY_RESNET["layers"]).state_dict(), file)
    return file


def tiny_whisper(file: Path) -> Path:
    """An openai-whisper checkpoint (dims + model_state_dict) with large-v3's 128 mels and tiny widths."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
                           n_vocab=64, n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": Whisper(dims).state_dict()}, file)
    return file


def tiny_llava(folder: Path) -> Path:
    """A llava-hf folder: tiny CLIP vision tower + tiny Llama, a word-level tokenizer, a processor."""
    prepare_torchvision()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "[CLASS]", "Describe", "the", "image", "text",
             "in", "one", "word.", "this", "video", "frame", "a", "b", "c", "d", "e", "f", "g", "h"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16, projection_dim=16),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"clip": tiny_clip(root / "clip"), "resnet": tiny_resnet(root / "resnet18.pth"),
            "whisper": tiny_whisper(root / "large-v3.pt"), "llava": tiny_llava(root / "llava")}


def _image(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _run(backbone, kind, decoded: list):
    pre = backbone.preprocessor()
    batch = pre.collate(kind, [pre.prepare(kind, d) for d in decoded])
    with torch.inference_mode():
        return backbone.encode(kind, batch)


def test_registry_has_the_names_users_type():
    for name in ("ola7b", "llava7b", "clip-vit-l14", "whisper-large-v3", "resnet18", "resnet50"):
        assert name in BACKBONES
    with pytest.raises(BackboneError, match="unknown backbone 'nope'.*ola7b"):
        build_backbone("nope", "/x")


def test_clip_image_video_text(weights):
    bb = build_backbone("clip-vit-l14", weights["clip"])
    assert bb.kinds == ("image", "video", "text") and bb.output_shape("video", 3) == (3, 16)
    x, _ = _run(bb, "image", [_image(0), _image(1, (64, 20))])
    assert x.shape == (2, 1, 16) and torch.allclose(x.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    v, _ = _run(bb, "video", [[_image(0), _image(2), _image(3)]])
    assert v.shape == (1, 3, 16) and torch.allclose(v[0, 0], x[0, 0], atol=1e-5)  # frame 0 is image 0
    t, _ = _run(bb, "text", ["a photo of a cat", "{braces} and <image> are plain text here"])
    assert t.shape == (2, 1, 16) and torch.isfinite(t).all()


def test_clip_from_a_state_dict_file_and_a_named_arch(weights, tmp_path):
    import open_clip

    folder_cfg = json.loads((weights["clip"] / "open_clip_config.json").read_text())
    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(folder_cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-test-vit.json")  # a named architecture, like "ViT-L-14"
    file = weights["clip"] / "open_clip_pytorch_model.bin"
    from_file = build_backbone("clip", file, {"arch": "tiny-test-vit"})
    from_folder = build_backbone("clip", weights["clip"])
    images = [_image(0)]
    assert torch.allclose(_run(from_file, "image", images)[0], _run(from_folder, "image", images)[0], atol=1e-6)
    with pytest.raises(BackboneError, match="unknown open_clip architecture"):
        build_backbone("clip", file, {"arch": "ViT-Tiny-Nonexistent"})
    with pytest.raises(BackboneError, match="cannot load CLIP weights"):
        build_backbone("clip", tiny_resnet(tmp_path / "r.pth"), {"arch": "tiny-test-vit"})


def test_resnet_image_and_video(weights):
    bb = build_backbone("resnet18", weights["resnet"], TINY_RESNET)
    assert bb.output_shape("image", 3) == (1, 512)
    x, _ = _run(bb, "image", [_image(0), _image(1)])
    v, _ = _run(bb, "video", [[_image(0), _image(1)]])
    assert x.shape == (2, 1, 512) and v.shape == (1, 2, 512)
    assert torch.allclose(v[0], x[:, 0], atol=1e-5)
    with pytest.raises(BackboneError, match="does not fit resnet50"):
        build_backbone("resnet50", weights["resnet"], TINY_RESNET)


def test_whisper_pools_valid_frames_and_stores_n_valid(weights):
    bb = build_backbone("whisper-large-v3", weights["whisper"])
    assert bb.kinds == ("audio",) and bb.output_shape("audio", 3) == (1, 16)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 40000, 16000 * 31)]
    x, extras = _run(bb, "audio", clips)
    # 1 s: 100 mel frames -> 50 encoder frames; 2.5 s -> 125; 31 s: 1500 (first 30 s) + 50 (last second).
    assert extras["n_valid"].tolist() == [50, 125, 1550]
    assert valid_frames(16000 * 30) == 1500 and valid_frames(100) == 1
    alone, _ = _run(bb, "audio", [clips[0]])
    assert x.shape == (3, 1, 16) and torch.allclose(alone[0], x[0], atol=1e-5)  # batch-independent
    # The pooled vector is the mean of the valid frames only.
    from whisper.audio import log_mel_spectrogram, pad_or_trim

    mel = log_mel_spectrogram(pad_or_trim(torch.from_numpy(clips[0])), n_mels=128)[None]
    with torch.inference_mode():
        frames = bb.model(mel)[0]
    assert torch.allclose(frames[:50].mean(0), x[0, 0], atol=1e-5)
    assert not torch.allclose(frames.mean(0), x[0, 0], atol=1e-3)


def test_llava_left_padding_gives_the_same_class_vector(weights):
    bb = build_backbone("llava7b", weights["llava"])
    assert bb.output_shape("text", 3) == (1, 16) and bb.output_shape("video", 4) == (4, 16)
    short, long = "a b", "a b c d e f g h a b c d e f g h"
    alone, _ = _run(bb, "text", [short])
    both, _ = _run(bb, "text", [long, short])
    assert torch.allclose(alone[0], both[1], atol=1e-5)
    img_alone, _ = _run(bb, "image", [_image(0)])
    imgs, _ = _run(bb, "image", [_image(1), _image(0)])
    assert torch.allclose(img_alone[0], imgs[1], atol=1e-5)
    same_prompt = build_backbone("llava7b", weights["llava"], {"prompts": {"video": bb.config["prompts"]["image"]}})
    frames, _ = _run(same_prompt, "video", [[_image(1), _image(0)]])
    assert frames.shape == (1, 2, 16) and torch.allclose(frames[0, 1], img_alone[0, 0], atol=1e-5)
    # The prompt ends with [CLASS]; its token ids are recorded for meta.json.
    assert bb.info["class_token_ids"] == [6]
    assert bb.info["prompts_resolved"]["image"].endswith("ASSISTANT: [CLASS]")


def test_llava_prompts_are_configurable_and_checked(weights):
    bb = build_backbone("llava7b", weights["llava"], {"prompts": {"text": "{text}\nthe text in one word."}})
    assert bb.record()["prompts"]["text"] == "{text}\nthe text in one word."
    assert bb.record()["prompts"]["image"].startswith("<image>")  # other kinds keep their default
    with pytest.raises(BackboneError, match="image prompt must contain <image> exactly once"):
        build_backbone("llava7b", weights["llava"], {"prompts": {"image": "no image token"}})
    with pytest.raises(BackboneError, match="unknown config key"):
        build_backbone("llava7b", weights["llava"], {"promts": {}})


def test_left_pad_positions_count_real_tokens():
    batch = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_ola_without_its_package_names_the_install(tmp_path):
    with pytest.raises(BackboneError) as err:
        build_backbone("ola7b", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "ola" in message and "pip install" in message


def test_missing_weights_is_one_clear_line(tmp_path):
    with pytest.raises(BackboneError, match="weights not found: .*nothing.pt"):
        build_backbone("whisper-large-v3", tmp_path / "nothing.pt")
    with pytest.raises(BackboneError, match="must be a folder"):
        build_backbone("llava7b", tiny_resnet(tmp_path / "r.pth"))
    with pytest.raises(BackboneError, match="not an openai-whisper checkpoint"):
        build_backbone("whisper-large-v3", tmp_path / "r.pth")


def test_whisper_n_valid_formula():
    for seconds in (0.5, 1.0, 7.3, 29.99):
        n = int(seconds * 16000)
        assert valid_frames(n) == math.ceil((n // 160) / 2)
