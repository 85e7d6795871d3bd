"""Ola-7B for real: a tiny random Ola built from Ola's own classes, extracted end to end by ``cli.py extract``.

Runs only where the ``ola`` package is installed (Ola's own environment, README "Ola-7B"); skipped
elsewhere, including CI. What is tiny: the Qwen2 LLM (2 layers, width 32), Whisper (width 16) and
BEATs (1 layer) speech encoders, a byte-level tokenizer. What is not: Ola's vision tower, whose
SigLIP-so400m size is written in Ola's code (``SigLIP_MODEL_CONFIG``) rather than in the config; the
test shrinks its depth to one block there (width 1152 stays, as Ola's wrapper assumes it).

On a machine without CUDA, ``flash_attn`` (imported by Ola's vision tower, CUDA-only) is replaced by
a module giving the same two functions through ``torch.nn.functional.scaled_dot_product_attention``;
where flash-attn is installed it is used as is.
"""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ola")

from tests.test_backbones import _image, tiny_whisper  # noqa: E402
from tests.test_decode import write_mp4, write_wav  # noqa: E402

TINY_BEATS = {"input_patch_size": 16, "embed_dim": 32, "encoder_layers": 1, "encoder_embed_dim": 16,
              "encoder_ffn_embed_dim": 32, "encoder_attention_heads": 2, "conv_pos": 16, "conv_pos_groups": 4,
              "layer_norm_first": False, "deep_norm": False, "relative_position_embedding": False}


def _sdpa_flash_attn() -> types.ModuleType:
    """flash_attn's two entry points Ola calls, on any device (inputs [B, N, H, D], varlen packed by cu_seqlens)."""
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale, is_causal=causal)
        return out.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=False, **_):
        bounds = cu_seqlens_q.tolist()
        parts = [flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
                 for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts)

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # libraries ask find_spec about it
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


@pytest.fixture(scope="module")
def ola_env():
    """Ola importable here: its environment variables set, flash_attn present (or the SDPA stand-in)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        sys.modules["flash_attn"] = _sdpa_flash_attn()
    from pipeline.backbones.ola import _import_ola

    ola = _import_ola()
    import ola.model.multimodal_encoder.oryx_vit as oryx

    cfg = oryx.SigLIP_MODEL_CONFIG["siglip_so400m_patch16_384"]
    saved = dict(cfg)
    cfg["layers"] = 1  # the one size Ola keeps in code, not in the config
    yield ola
    cfg.update(saved)


def _byte_tokenizer(folder: Path):
    """A Qwen2 (slow, byte-level BPE) tokenizer over the 256 bytes with Qwen's special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = Qwen2Tokenizer(folder / "vocab.json", folder / "merges.txt", unk_token="<|endoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def tiny_ola(folder: Path) -> Path:
    """An Ola-7b-layout folder (config.json, safetensors, tokenizer, speech encoder checkpoints), tiny and random."""
    from ola.model import OlaConfigQwen, OlaQwenForCausalLM
    from ola.model.speech_encoder.beats.BEATs import BEATs, BEATsConfig

    from pipeline.backbones.ola import _clip_processor_offline, _in_folder

    folder.mkdir(parents=True)
    tiny_whisper(folder / "large-v3.pt")
    torch.manual_seed(0)
    torch.save({"cfg": TINY_BEATS, "model": BEATs(BEATsConfig(TINY_BEATS)).state_dict()}, folder / "BEATs.pt")
    tokenizer = _byte_tokenizer(folder)
    config = OlaConfigQwen(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        speech_encoder="large-v3.pt", music_encoder="BEATs.pt", speech_encoder_type="dual",  # relative paths
        speech_projector_type="linear", speech_encoder_ds_rate=10, speech_encoder_hidden_size=16 + 16,
        mm_vision_tower="oryx_vit:SigLIP-so400m", mm_projector_type="ola_mlp", mm_hidden_size=1152,
        mm_vision_select_layer=-1, mm_vision_select_feature="patch", tokenizer_padding_side="right",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="square",
    )
    torch.manual_seed(0)
    with _in_folder(folder), _clip_processor_offline():
        model = OlaQwenForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ola_extracts_every_kind_end_to_end(ola_env, tmp_path, monkeypatch):
    from cache import load_meta, load_split, verify
    from tests.test_extract import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tiny_ola(tmp_path / "Ola-7b")
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True)
    write_mp4(data / "media" / "v.mp4", frames=10, fps=10)
    rows = ["sample_id,label,split,image_path,audio_path,video_path,text"]
    for i in range(3):
        _image(i, (48 + 8 * i, 40)).save(data / "media" / f"{i}.jpg", quality=90)
        write_wav(data / "media" / f"{i}.wav", 0.5 + 0.5 * i, seed=i)
        rows.append(f"s{i},{'ab'[i % 2]},train,media/{i}.jpg,media/{i}.wav,media/v.mp4,\"a {'b ' * (3 * i)}c\"")
    (data / "samples.csv").write_text("\n".join(rows) + "\n")
    result = cli("extract", "folder", "--backbone", "ola7b", "--weights", weights, "--data-root", data,
                 "--out", tmp_path / "out", "--workers", 0, "--batch-size", 2, "--frames", 2, "--quiet", "--verbose",
                 "--dtype", "bf16")  # Ola's speech encoder hands bf16 to its projector, whatever the weights
    print(result.output)  # the run's record (pytest -s shows it)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "out" / "folder" / "ola7b"
    assert verify(cache) == []
    meta = load_meta(cache)
    assert meta["modalities"] == {m: {"tokens": 1, "dim": 32} for m in ("image", "audio", "video", "text")}
    assert meta["backbone_config"]["info"]["prompts_resolved"]["image"].startswith("<|im_start|>system")
    split = load_split(cache, "train")
    assert split.ids and all(np.isfinite(split.features[m].numpy()).all() for m in split.features)
    # Each modality's [CLASS] vector is its own: no two modalities of a sample give the same vector.
    x = {m: split.features[m][0, 0].numpy() for m in split.features}
    assert len({tuple(np.round(v, 4)) for v in x.values()}) == 4


def test_ola_class_vector_does_not_depend_on_the_batch(ola_env, tmp_path):
    from pipeline.backbones import build_backbone

    bb = build_backbone("ola7b", tiny_ola(tmp_path / "Ola-7b"), dtype=torch.bfloat16)
    pre = bb.preprocessor()

    def run(kind, items):
        batch = pre.collate(kind, [pre.prepare(kind, it) for it in items])
        with torch.inference_mode():
            return bb.encode(kind, batch)[0]

    def same(alone, batched):  # bf16 (Ola's dtype): rounding differs with the batch's shapes, not more
        return float((alone.float() - batched.float()).abs().max() / alone.float().abs().max()) < 3e-2

    short, long = "a b", "a b c d e f g h i j k l m n o p"
    assert same(run("text", [short])[0], run("text", [long, short])[1])
    img = [_image(0, (48, 40)), _image(1, (64, 40))]
    assert same(run("image", img[:1])[0], run("image", [img[1], img[0]])[1])
    rng = np.random.default_rng(0)
    wav = [rng.standard_normal(16000).astype(np.float32) * 0.1, rng.standard_normal(24000).astype(np.float32) * 0.1]
    assert same(run("audio", wav[:1])[0], run("audio", [wav[1], wav[0]])[1])
