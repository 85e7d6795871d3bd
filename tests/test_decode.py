"""Decoding real small media files written here (JPEG, WAV, MP4), and every way a file can be bad."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline.decode import DecodeError, load_audio, load_image, load_text, load_video_frames


def write_jpeg(path: Path, seed: int = 0, size=(64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def write_wav(path: Path, seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype(np.float32), rate)
    return path


def write_mp4(path: Path, frames: int = 30, fps: int = 10, audio_seconds: float = 0.0) -> Path:
    """An MPEG-4 video whose frame i is a flat grey of value 8*i (so a frame's index can be read back)."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=16000) if audio_seconds else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            wav = (np.random.default_rng(0).standard_normal((1, int(audio_seconds * 16000))) * 0.1).astype(np.float32)
            for start in range(0, wav.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                out.mux(audio.encode(chunk))
            out.mux(audio.encode())
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_image_decodes_to_rgb(tmp_path):
    img = load_image(write_jpeg(tmp_path / "a.jpg"))
    assert img.mode == "RGB" and img.size == (64, 48)
    Image.new("L", (5, 7), 100).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png", transparency=0)
    assert load_image(tmp_path / "pal.png").mode == "RGB"


@pytest.mark.parametrize("make, reason", [
    (lambda d: truncated_copy(write_jpeg(d / "a.jpg"), d / "t.jpg"), "undecodable image"),
    (lambda d: d / "missing.jpg", "missing file"),
    (lambda d: write_bytes(d / "zero.jpg", b""), "empty file"),
    (lambda d: write_bytes(d / "text.jpg", b"not an image"), "undecodable image"),
])
def test_bad_images_raise_decode_error(tmp_path, make, reason):
    with pytest.raises(DecodeError, match=reason):
        load_image(make(tmp_path))


def test_audio_resampled_to_16k_mono(tmp_path):
    x = load_audio(write_wav(tmp_path / "a.wav", 2.0, rate=44100, channels=2))
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 32000) <= 64
    same = load_audio(write_wav(tmp_path / "b.wav", 1.5))
    assert len(same) == 24000
    part = load_audio(tmp_path / "b.wav", window=(0.5, 1.0))
    assert len(part) == 8000 and np.allclose(part, same[8000:16000])


def test_audio_track_of_a_video_through_pyav(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", audio_seconds=2.0)
    x = load_audio(path)
    assert abs(len(x) - 32000) < 1600  # the AAC encoder's priming and padding
    assert len(load_audio(path, window=(0.5, 1.0))) == 8000


@pytest.mark.parametrize("make, reason", [
    (lambda d: write_bytes(d / "zero.wav", b""), "empty file"),
    (lambda d: write_bytes(d / "junk.wav", b"RIFF not really audio" * 20), "undecodable audio"),
    (lambda d: d / "missing.wav", "missing file"),
    (lambda d: write_bytes(d / "junk.m4a", b"\x00\x01" * 300), "undecodable audio"),
    (lambda d: write_mp4(d / "silent.mp4"), "no audio stream"),
])
def test_bad_audio_raises_decode_error(tmp_path, make, reason):
    with pytest.raises(DecodeError, match=reason):
        load_audio(make(tmp_path))


def test_video_frames_at_segment_middles(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", frames=30, fps=10)  # 3 s
    frames = load_video_frames(path, 3)
    # t = 0.5, 1.5, 2.5 s -> frames 5, 15, 25 -> grey 40, 120, 200 (lossy codec: +-6)
    grey = [float(np.asarray(f).mean()) for f in frames]
    assert all(abs(g - e) < 6 for g, e in zip(grey, (40, 120, 200))), grey
    assert frames[0].size == (64, 48) and frames[0].mode == "RGB"
    again = load_video_frames(path, 3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again))
    inside = [float(np.asarray(f).mean()) for f in load_video_frames(path, 2, window=(1.0, 2.0))]
    assert all(abs(g - e) < 6 for g, e in zip(inside, (8 * 12, 8 * 17))), inside  # t = 1.25, 1.75 s
    assert len(load_video_frames(path, 40)) == 40  # more frames than the clip has: repeats, never fails


def test_bad_video_raises_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="undecodable video"):
        load_video_frames(truncated_copy(write_mp4(tmp_path / "a.mp4"), tmp_path / "v.mp4"), 3)
    with pytest.raises(DecodeError, match="undecodable video"):
        load_video_frames(write_bytes(tmp_path / "junk.mp4", bytes(range(256)) * 8), 3)
    with pytest.raises(DecodeError, match="no video stream"):
        load_video_frames(write_wav(tmp_path / "a.wav", 1.0), 3)
    with pytest.raises(DecodeError, match="missing file"):
        load_video_frames(tmp_path / "none.mp4", 3)


def test_text(tmp_path):
    assert load_text("  hello  ") == "hello"
    with pytest.raises(DecodeError, match="empty text"):
        load_text("   ")
    (tmp_path / "t.txt").write_bytes("café".encode("latin-1"))
    assert load_text(tmp_path / "t.txt") == "café"
    with pytest.raises(DecodeError, match="missing file"):
        load_text(tmp_path / "none.txt")
