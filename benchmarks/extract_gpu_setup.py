"""What ``bench_extract_gpu.py`` measures on: the models at their published sizes (or tiny, for the CPU
check), their weights written where the product loads them from, and generated media (JPEGs, WAVs,
prompts). Kept apart so the benchmark script reads as what it measures.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import prepare_torchvision
from pipeline.backbones.llava import LlavaBackbone

# Published sizes. Whisper large-v3: openai-whisper's ModelDimensions for that checkpoint.
WHISPER_LARGE_V3 = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                        n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32)
# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json): CLIP ViT-L/14 at 336 px + Vicuna-7B (Llama).
LLAVA_15_7B = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "vision_feature_layer": -2,
}
SIZES = {  # per mode: samples, unique media files, batch sizes, timed repeats of the model alone
    "real": dict(images=16384, unique_images=2048, clip_batch=256, wavs=2048, unique_wavs=512, whisper_batch=64,
                 valid_wavs=8192, valid_batch=256, prompts=512, llava_batch=16, repeats=8),
    "tiny": dict(images=48, unique_images=8, clip_batch=8, wavs=12, unique_wavs=4, whisper_batch=4, valid_wavs=12,
                 valid_batch=4, prompts=6, llava_batch=2, repeats=2),
}
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_WHISPER = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1, n_vocab=64,
                    n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)
TINY_LLAVA = {
    "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=16, projection_dim=16),
    "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=128),
    "vision_feature_layer": -2,
}


# ---- media ------------------------------------------------------------------------------------------------------


def _jpeg(args):
    path, i = args
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:375, 0:500]
    f = rng.uniform(0.005, 0.05, 3)
    img = np.stack([127 + 120 * np.sin(f[c] * (xx + yy * (c + 1)) + i) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _wav(args):
    path, i, seconds = args
    import soundfile as sf

    rng = np.random.default_rng(i)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    sf.write(path, (x + rng.normal(0, 0.02, t.shape)).astype(np.float32), 16000)


def make_dataset(root: Path, column: str, unique: int, samples: int, writer, ext: str, workers: int, *extra) -> Path:
    """A ``folder`` dataset of ``samples`` rows over ``unique`` generated files (reused cyclically; decoded per row)."""
    (root / "media").mkdir(parents=True)
    jobs = [(root / "media" / f"{i}.{ext}", i, *extra) for i in range(unique)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(writer, jobs, chunksize=16))
    rows = ["sample_id,label,split," + column]
    rows += [f"{i:06d},{'ab'[i % 2]},train,media/{i % unique}.{ext}" for i in range(samples)]
    (root / "samples.csv").write_text("\n".join(rows) + "\n")
    return root


# ---- weights -----------------------------------------------------------------------------------------------------


def clip_weights(folder: Path, tiny: bool, device) -> Path:
    prepare_torchvision()
    import open_clip

    cfg = TINY_CLIP if tiny else open_clip.get_model_config("ViT-L-14")
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    with torch.device(device):
        model = open_clip.CLIP(**cfg)
    torch.save({k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items()},
               folder / "open_clip_pytorch_model.bin")
    return folder


def whisper_weights(file: Path, tiny: bool, device) -> Path:
    from whisper.model import AudioEncoder, ModelDimensions

    dims = ModelDimensions(**(TINY_WHISPER if tiny else WHISPER_LARGE_V3))
    with torch.device(device):
        enc = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    state = {f"encoder.{k}": v.to(torch.bfloat16 if v.is_floating_point() else v.dtype).cpu()
             for k, v in enc.state_dict().items()}
    torch.save({"dims": asdict(dims), "model_state_dict": state}, file)
    return file


def llava_folder(folder: Path, tiny: bool) -> Path:
    """A llava-hf folder without weights: config.json at the published (or tiny) sizes, a tokenizer, a processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor,
                              PreTrainedTokenizerFast)

    sizes = TINY_LLAVA if tiny else LLAVA_15_7B
    words = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "[CLASS]", "Describe", "the", "image", "text",
             "in", "one", "word.", "this", "video", "frame", "a", "b", "c"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"])
    size = sizes["vision"]["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=sizes["vision"]["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    text = dict(sizes["text"])
    text.setdefault("vocab_size", len(tokenizer))
    config = LlavaConfig(vision_config=CLIPVisionConfig(**sizes["vision"]),
                         text_config=LlamaConfig(pad_token_id=tokenizer.pad_token_id, **text),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=sizes["vision_feature_layer"])
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class BuiltLlava(LlavaBackbone):
    """The product's LLaVA backbone with its model built from config.json on the device instead of read from disk."""

    def load_model(self, path, options):
        from transformers import AutoConfig, LlavaForConditionalGeneration

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device(self.device):
            return LlavaForConditionalGeneration._from_config(config, dtype=self.dtype, **options)
