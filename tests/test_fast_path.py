"""The fast extraction path computes the same function as the plain one, family by family.

Each test builds a tiny random backbone twice from the same files, ``fast=False`` (the plain path:
float32 weights, under autocast for a reduced dtype, the whole preprocessing in the workers) and
``fast=True`` (weights cast to the compute dtype the library's way, uint8 images normalised on the
device, SDPA, length-bucketed prompts), and compares the features on the same inputs.

Tolerances, as max |fast - plain| over all outputs, relative to max |plain| (the feature scale):

- float32 fast vs float32 plain: ``FP32_RTOL = 1e-5`` (the same arithmetic; measured 0 to 2e-7);
- bf16 fast vs float32 plain: ``BF16_RTOL = 3e-2``. bf16 keeps 8 significant bits (2^-8 = 0.4%
  per rounding); these tiny models measure 0.5-0.9% (the plain path's own bf16 autocast measures
  the same), so 3% leaves room for the rounding of other kernels. The same bound is what the GPU
  check uses: where CUDA is present the bf16 cases run on it (``DEVICES``), and
  ``benchmarks/bench_extract_gpu.py`` prints fast-vs-plain distances for the real-size models.
- Images decoded on the device (nvJPEG, then an antialiased torch resize) are not PIL to the last
  bit: ``DEVICE_DECODE_RTOL = 3e-2`` on the features, and at most 4 uint8 levels per pixel against
  PIL's resize (measured 2 on a 500x375 photo, mean 0.17). On a machine without nvJPEG the decoding
  step is played by PIL through the same code path (``fake_nvjpeg``); the resize, crop, batching and
  fallbacks are the code under test.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import images as images_mod
from pipeline.backbones import build_backbone
from pipeline.backbones.whisper import valid_frames, valid_mel
from tests.test_backbones import TINY_RESNET, _image, tiny_clip, tiny_llava, tiny_resnet, tiny_whisper
from tests.test_decode import truncated_copy

FP32_RTOL = 1e-5
BF16_RTOL = 3e-2
DEVICE_DECODE_RTOL = 3e-2
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {"clip": tiny_clip(root / "clip"), "resnet": tiny_resnet(root / "resnet18.pth"),
            "whisper": tiny_whisper(root / "large-v3.pt"), "llava": tiny_llava(root / "llava")}


def _photos(n: int = 4) -> list[Image.Image]:
    return [_image(i, (40 + 7 * i, 30 + 5 * i)) for i in range(n)]


def _wavs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 40000, 8000)]


def run(bb, kind: str, decoded: list) -> torch.Tensor:
    """The engine's steps for one batch, in-process: prepare, collate, to the device, encode (autocast as it does)."""
    from pipeline.encoding import to_device

    pre = bb.preprocessor()
    batch = to_device(pre.collate(kind, [pre.prepare(kind, d) for d in decoded]), bb.device)
    with torch.inference_mode(), torch.autocast(bb.device.type, dtype=bb.dtype, enabled=bb.autocast):
        return bb.encode(kind, batch)[0].float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [  # (registry name, config, kind, inputs)
    ("clip-vit-l14", None, "image", _photos),
    ("clip-vit-l14", None, "video", lambda: [_photos(3)]),
    ("clip-vit-l14", None, "text", lambda: ["a photo of a cat", "b c d e f g"]),
    ("resnet18", TINY_RESNET, "image", _photos),
    ("resnet18", TINY_RESNET, "video", lambda: [_photos(2)]),
    ("whisper-large-v3", None, "audio", _wavs),
    ("llava7b", None, "image", lambda: _photos(2)),
    ("llava7b", None, "text", lambda: ["a b", "a b c d e f"]),
]


def _family(name: str) -> str:
    return {"clip-vit-l14": "clip", "resnet18": "resnet", "whisper-large-v3": "whisper", "llava7b": "llava"}[name]


@pytest.mark.parametrize("name, config, kind, inputs", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_fast_fp32_is_the_plain_path(weights, name, config, kind, inputs):
    data = inputs()
    plain = run(build_backbone(name, weights[_family(name)], config, fast=False), kind, data)
    fast_bb = build_backbone(name, weights[_family(name)], config)
    assert fast_bb.fast and fast_bb.runtime()["path"] == "fast"
    assert rel(run(fast_bb, kind, data), plain) <= FP32_RTOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, config, kind, inputs", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_fast_bf16_is_within_bf16_tolerance(weights, name, config, kind, inputs, device):
    data = inputs()
    plain = run(build_backbone(name, weights[_family(name)], config, fast=False), kind, data)
    fast_bb = build_backbone(name, weights[_family(name)], config, device=device, dtype=torch.bfloat16)
    assert rel(run(fast_bb, kind, data), plain) <= BF16_RTOL


def test_fast_weights_are_cast_the_libraries_way(weights):
    bf16 = torch.bfloat16
    clip = build_backbone("clip", weights["clip"], dtype=bf16)
    visual = clip.model.visual
    assert visual.conv1.weight.dtype == bf16 and clip.pixel_dtype == bf16
    assert type(visual.ln_pre).__name__ == "LayerNormFp32" and visual.ln_pre.weight.dtype == torch.float32
    whisper = build_backbone("whisper", weights["whisper"], dtype=bf16)
    enc = whisper.model
    assert enc.conv1.weight.dtype == bf16 and enc.blocks[0].attn.query.weight.dtype == bf16
    assert enc.ln_post.weight.dtype == torch.float32 and enc.positional_embedding.dtype == torch.float32
    plain = build_backbone("whisper", weights["whisper"], dtype=bf16, fast=False)
    assert plain.model.conv1.weight.dtype == torch.float32 and plain.autocast and not whisper.autocast
    resnet = build_backbone("resnet18", weights["resnet"], TINY_RESNET, dtype=bf16)
    assert resnet.model.conv1.weight.dtype == bf16
    llava = build_backbone("llava7b", weights["llava"])
    assert llava.model.config.text_config._attn_implementation == "sdpa"


def test_workers_hand_over_uint8(weights):
    for bb, kind in ((build_backbone("clip", weights["clip"]), "image"),
                     (build_backbone("resnet18", weights["resnet"], TINY_RESNET), "video"),
                     (build_backbone("llava7b", weights["llava"]), "image")):
        pre = bb.preprocessor()
        item = pre.prepare(kind, [_image(0)] if kind == "video" else _image(0))
        pixels = item["pixel_values"] if isinstance(item, dict) else item
        assert pixels.dtype == torch.uint8
        plain = build_backbone(bb.family if bb.family != "resnet" else "resnet18", bb.info["weights"],
                               TINY_RESNET if bb.family == "resnet" else None, fast=False).preprocessor()
        item = plain.prepare(kind, [_image(0)] if kind == "video" else _image(0))
        assert (item["pixel_values"] if isinstance(item, dict) else item).dtype == torch.float32


# ---- images decoded on the device ----------------------------------------------------------------------------


def _pil_decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plays nvJPEG on a machine without it: the same list-in, list-out contract as ``decode_jpeg``."""
    out = []
    for d in datas:
        with Image.open(io.BytesIO(d.numpy().tobytes())) as img:
            out.append(images_mod.to_uint8(img))
    return out


@pytest.fixture
def fake_nvjpeg(monkeypatch):
    calls = []

    def decoder(datas):
        calls.append(len(datas))
        return _pil_decode(datas)

    monkeypatch.setattr(images_mod, "device_jpeg_decoder", lambda device_type: decoder)
    return calls


def _jpegs(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:30 + 9 * i, 0:44 + 5 * i]
        img = np.stack([127 + 120 * np.sin(0.2 * (xx + yy * (c + 1)) + i) for c in range(3)], -1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=92)
        paths.append(folder / f"{i}.jpg")
    return paths


def test_device_decoding_matches_pil_within_tolerance(weights, tmp_path, fake_nvjpeg):
    paths = _jpegs(tmp_path)
    from pipeline.decode import load_image

    for name, config in (("clip", None), ("resnet18", TINY_RESNET)):
        plain = build_backbone(name, weights[_family(name) if name != "clip" else "clip"], config, fast=False)
        device = build_backbone(name, plain.info["weights"], config, image_decode="device")
        assert device.image_decode == "device" and device.runtime()["image_decode"] == "device"
        pre = device.preprocessor()
        loaded = [pre.load("image", p, None, 1) for p in paths]
        assert all(isinstance(x, images_mod.JpegBytes) for x in loaded)  # no decoding in the worker
        png = tmp_path / "x.png"
        _image(3).save(png)
        loaded.append(pre.load("image", png, None, 1))  # not a JPEG: decoded by PIL in the worker
        assert isinstance(loaded[-1], Image.Image)
        batch = pre.collate("image", [pre.prepare("image", x) for x in loaded])
        assert batch["jpeg_rows"] == [0, 1, 2, 3] and batch["pixel_rows"].tolist() == [4]
        with torch.inference_mode():
            got = device.encode("image", batch)[0]
        want = run(plain, "image", [load_image(p) for p in paths] + [load_image(png)])
        assert rel(got, want) <= DEVICE_DECODE_RTOL
        assert torch.allclose(got[4], want[4], atol=1e-5)  # the PNG took the worker's path: exact
    assert fake_nvjpeg and all(n == len(paths) for n in fake_nvjpeg)  # one decoder call per batch


def test_device_resize_is_pil_within_a_few_levels():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    photo = np.stack([127 + 120 * np.sin(0.02 * (xx + yy * (c + 1))) for c in range(3)], -1)
    photo = Image.fromarray((photo + rng.normal(0, 12, photo.shape)).clip(0, 255).astype(np.uint8))
    for transform in (
        T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                   T.Normalize([0.5] * 3, [0.5] * 3)]),
        T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.ToTensor(),
                   T.Normalize([0.5] * 3, [0.5] * 3)]),
    ):
        pil_steps, spec = images_mod.split_transform(transform)
        assert images_mod.device_decodable(spec)
        want = images_mod.to_uint8(pil_steps(photo)).int()
        got = images_mod.resize_crop(images_mod.to_uint8(photo), spec).int()
        assert got.shape == want.shape == (3, 224, 224)
        assert (got - want).abs().max() <= 4 and (got - want).abs().float().mean() < 0.5
        # the device's normalisation is ToTensor + Normalize
        x = images_mod.normalize(want.to(torch.uint8), spec, torch.float32)
        assert torch.allclose(x, transform(photo), atol=1e-6)


def test_device_decoding_falls_back_and_fails_one_row_only(tmp_path, monkeypatch):
    spec = images_mod.ImageSpec((0.5,) * 3, (0.5,) * 3, 16, (16, 16), "bicubic")
    good = images_mod.read_jpeg(_jpegs(tmp_path, 1)[0])
    broken = images_mod.JpegBytes(torch.frombuffer(bytearray(images_mod.JPEG_MAGIC + b"garbage" * 20),
                                                   dtype=torch.uint8))
    calls = []

    def nvjpeg(datas):  # refuses any batch holding the broken file, as decode_jpeg raises for the batch
        calls.append(len(datas))
        if any(d.numel() == broken.data.numel() for d in datas):
            raise RuntimeError("nvjpeg: bad data")
        return _pil_decode(datas)

    batch = images_mod.collate_images([good, broken, good])
    x = images_mod.assemble(batch, spec, torch.float32, torch.device("cpu"), nvjpeg)
    assert x.shape == (3, 3, 16, 16) and calls == [3, 1, 1, 1]  # the batch, then one by one
    assert list(batch["failed_rows"]) == [1] and batch["failed_rows"][1].startswith("undecodable image")
    assert torch.equal(x[0], x[2])


def test_truncated_jpeg_is_caught_in_the_worker(tmp_path):
    from pipeline.decode import DecodeError

    path = _jpegs(tmp_path, 1)[0]
    big = tmp_path / "big.jpg"
    _image(0, (400, 300)).save(big, quality=95)
    with pytest.raises(DecodeError, match="undecodable image"):
        images_mod.read_jpeg(truncated_copy(big, tmp_path / "t.jpg"))
    assert images_mod.read_jpeg(path).data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def test_no_nvjpeg_on_a_cpu_machine_means_cpu_decoding(weights):
    assert images_mod.device_jpeg_decoder("cpu") is None
    bb = build_backbone("clip", weights["clip"], image_decode="device")  # asked for, not available
    assert bb.image_decode == "cpu" and bb.jpeg_decoder is None


# ---- whisper: valid frames only -----------------------------------------------------------------------------


def test_valid_mel_is_the_30s_mel_prefix():
    from whisper.audio import log_mel_spectrogram, pad_or_trim

    for n, seed in ((16000, 0), (40037, 1), (2500, 2), (16000 * 29 + 123, 3)):
        wav = torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.1)
        full = log_mel_spectrogram(pad_or_trim(wav), n_mels=128)
        mine = valid_mel(wav, 128)
        assert mine.shape == (128, 2 * valid_frames(n))
        assert torch.allclose(mine, full[:, : mine.shape[1]], atol=1e-4)


def test_whisper_valid_window_batch_independent_and_exact_on_a_full_window(weights):
    valid = build_backbone("whisper", weights["whisper"], {"window": "valid"})
    full = build_backbone("whisper", weights["whisper"])
    wavs = _wavs() + [np.random.default_rng(5).standard_normal(16000 * 31).astype(np.float32) * 0.1]
    x = run(valid, "audio", wavs)
    for i, w in enumerate(wavs):
        assert torch.allclose(run(valid, "audio", [w])[0], x[i], atol=1e-5)  # alone == in a batch
    # A 30 s chunk has nothing to leave out: the sliced, masked encoder is whisper's own forward.
    exactly_30s = [wavs[-1][: 16000 * 30]]
    assert torch.allclose(run(valid, "audio", exactly_30s), run(full, "audio", exactly_30s), atol=1e-5)
    # Shorter clips: another function (documented), same shape and frame counts.
    y = run(full, "audio", wavs)
    assert x.shape == y.shape and rel(x[:3], y[:3]) > 1e-3
    with pytest.raises(Exception, match="window must be 30s or valid"):
        build_backbone("whisper", weights["whisper"], {"window": "10s"})


# ---- LLM text prompts by length -----------------------------------------------------------------------------


def test_llm_text_prompts_are_batched_by_length(weights, tmp_path):
    from pipeline.datasets import get_dataset
    from pipeline.extract import run_extraction
    from cache import load_split

    texts = ["a b c d e f g h a b c d e f g h", "a", "a b c d e f g h", "a b", "a b c d e f g h a b c", "a b c"]
    rows = ["sample_id,label,split,text"] + [f"t{i},{'xy'[i % 2]},train,{t}" for i, t in enumerate(texts)]
    (tmp_path / "samples.csv").write_text("\n".join(rows) + "\n")
    ds = get_dataset("folder", tmp_path)
    features, widths = {}, {}
    for fast in (True, False):
        bb = build_backbone("llava7b", weights["llava"], fast=fast)
        widths[fast], encode = [], bb.encode

        def recording(kind, batch, encode=encode, seen=widths[fast]):
            seen.append(batch["input_ids"].shape[1])  # the padded prompt length of this batch
            return encode(kind, batch)

        bb.encode = recording
        run_extraction(ds, bb, "llava7b", tmp_path / f"c{fast}", batch_size=2, workers=0, progress=False)
        split = load_split(tmp_path / f"c{fast}", "train")
        features[fast] = dict(zip(split.ids, split.features["text"].numpy()))
    assert widths[True] == sorted(widths[True]) and sum(widths[True]) < sum(widths[False])
    for sid, x in features[True].items():  # left padding with real-token positions: batch-independent
        assert np.allclose(x, features[False][sid], atol=2e-3)  # the cache stores float16


# ---- the CLI: --plain, --verbose, --whisper-window ----------------------------------------------------------


def test_cli_plain_verbose_and_whisper_window(weights, tmp_path):
    from cache import load_meta, load_split, verify
    from tests.test_decode import write_wav
    from tests.test_extract import cli

    (tmp_path / "d").mkdir()
    rows = ["sample_id,label,split,audio_path,image_path"]
    for i in range(4):
        write_wav(tmp_path / "d" / f"{i}.wav", 0.5 + i, seed=i)
        _image(i, (50, 40)).save(tmp_path / "d" / f"{i}.jpg", quality=90)
        rows.append(f"s{i},{'ab'[i % 2]},train,{i}.wav,{i}.jpg")
    (tmp_path / "d" / "samples.csv").write_text("\n".join(rows) + "\n")
    base = ["extract", "folder", "--data-root", tmp_path / "d", "--workers", 0, "--quiet"]
    result = cli(*base, "--backbone", "clip", "--weights", weights["clip"], "--out", tmp_path / "fast", "--verbose")
    assert result.exit_code == 0, result.output
    assert "start-up" in result.output and "weights" in result.output and "first batch" in result.output
    result = cli(*base, "--backbone", "clip", "--weights", weights["clip"], "--out", tmp_path / "plain", "--plain")
    assert result.exit_code == 0, result.output
    fast, plain = (load_split(tmp_path / p / "folder" / "clip", "train") for p in ("fast", "plain"))
    assert np.allclose(fast.features["image"].numpy(), plain.features["image"].numpy(), atol=1e-3)
    assert load_meta(tmp_path / "plain" / "folder" / "clip")["extraction"]["runtime"]["path"] == "plain"

    w = ["--backbone", "whisper", "--weights", weights["whisper"], "--out", tmp_path / "w"]
    result = cli(*base, *w, "--whisper-window", "valid")
    assert result.exit_code == 0, result.output
    cache = tmp_path / "w" / "folder" / "whisper"
    assert verify(cache) == [] and load_meta(cache)["backbone_config"]["window"] == "valid"
    again = cli(*base, *w)  # the 30 s window into the same cache: other features, refused
    assert again.exit_code == 2 and "other settings" in again.stderr
    wrong = cli(*base, "--backbone", "clip", "--weights", weights["clip"], "--whisper-window", "valid")
    assert wrong.exit_code == 2 and "whisper" in wrong.stderr
    bad = cli(*base, "--backbone", "clip", "--weights", weights["clip"], "--image-decode", "gpu")
    assert bad.exit_code == 2 and "--image-decode" in bad.stderr
