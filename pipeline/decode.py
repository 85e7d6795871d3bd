"""Decode one media file into what a backbone's preprocessing takes: PIL images, 16 kHz audio, text.

Runs inside DataLoader workers. Every failure (missing, empty, truncated or undecodable file) becomes
a ``DecodeError`` with a short reason, so the engine can skip that sample, list it in
``failed.parquet`` and go on. Audio and video are decoded in-process (soundfile, PyAV): no ``ffmpeg``
binary is needed, unlike ``whisper.load_audio``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

_SOUNDFILE_EXTS = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
# What a Git LFS clone without `git lfs pull` holds instead of each media file: a ~130-byte text.
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
LFS_REASON = "Git LFS pointer, not media"
_QUOTED = re.compile(r"'[^']*'")


class DecodeError(Exception):
    """A source could not be decoded. The message is a short reason, stored in failed.parquet."""


def _check_file(path) -> Path:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DecodeError("missing file") from None
    except OSError as err:
        raise DecodeError(f"unreadable file ({err.strerror or err})") from None
    if not path.is_file():
        raise DecodeError("not a file")
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    if size < 1024:  # pointers are ~130 bytes; no real media file is this small and starts so
        try:
            with open(path, "rb") as f:
                head = f.read(len(LFS_MAGIC))
        except OSError as err:
            raise DecodeError(f"unreadable file ({err.strerror or err})") from None
        if head == LFS_MAGIC:
            raise DecodeError(f"{LFS_REASON}: '{path.name}'")
    return path


def cause(reason: str) -> str:
    """A failure reason without the file it names (quoted names become ``<file>``).

    Why: the end-of-extraction summary counts failures by cause; with the file name left in, 7442
    undecodable clips would be 7442 one-line "causes". ``failed.parquet`` keeps the full reasons.
    """
    return _QUOTED.sub("<file>", reason)


def _reason(err: Exception, path: Path) -> str:
    """``ErrorType: first line`` with the file's folder left out, short enough for a table cell."""
    text = str(err).strip().splitlines()[0].replace(str(path), path.name) if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


def load_image(path) -> "PIL.Image.Image":
    """Open and fully decode an image as RGB (``load()`` makes a truncated JPEG fail here, not later)."""
    from PIL import Image

    path = _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"undecodable image ({_reason(err, path)})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise DecodeError("image has no pixels")
    return rgb


def _resample(chunks, rate_in: int, rate_out: int, layout: str) -> np.ndarray:
    """Down-mix to mono and resample float32 chunks with libswresample (through PyAV)."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    out = []
    for x in chunks:  # x: [channels, n] float32
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate_in
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _audio_soundfile(path: Path, sr: int, window) -> np.ndarray:
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            rate, channels = f.samplerate, f.channels
            if window is not None:
                f.seek(min(int(round(window[0] * rate)), f.frames))
                n = max(0, int(round((window[1] - window[0]) * rate)))
            else:
                n = -1
            x = f.read(n, dtype="float32", always_2d=True)  # [n, channels]
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        raise DecodeError(f"undecodable audio ({_reason(err, path)})") from None
    if rate == sr:
        return x.mean(axis=1) if channels > 1 else x[:, 0]
    layout = "mono" if channels == 1 else "stereo" if channels == 2 else None
    if layout is None:
        x, layout = x.mean(axis=1, keepdims=True), "mono"
    return _resample([x.T], rate, sr, layout)


def _audio_pyav(path: Path, sr: int, window) -> np.ndarray:
    import av

    start = int(round(window[0] * sr)) if window else 0
    stop = int(round(window[1] * sr)) if window else None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    out, have = [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError("no audio stream")
            for frame in container.decode(container.streams.audio[0]):
                frame.pts = None  # the resampler then keeps its own running count, robust to broken timestamps
                for f in resampler.resample(frame):
                    out.append(f.to_ndarray().reshape(-1))
                    have += out[-1].shape[0]
                if stop is not None and have >= stop:
                    break
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.FFmpegError as err:
        raise DecodeError(f"undecodable audio ({_reason(err, path)})") from None
    x = np.concatenate(out) if out else np.zeros(0, np.float32)
    return x[start:stop]


def load_audio(path, sr: int = 16000, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode to mono float32 at ``sr`` Hz; ``window=(start_s, end_s)`` keeps only that span.

    WAV/FLAC go through soundfile, everything else (m4a, mp3, the audio track of a video) through PyAV.
    """
    path = _check_file(path)
    if window is not None and not (0 <= window[0] < window[1]):
        raise DecodeError(f"invalid window {window}")
    if path.suffix.lower() in _SOUNDFILE_EXTS:
        x = _audio_soundfile(path, sr, window)
    else:
        x = _audio_pyav(path, sr, window)
    if x.shape[0] == 0:
        raise DecodeError("no audio samples")
    if not np.isfinite(x).all():
        raise DecodeError("non-finite audio samples")
    return np.ascontiguousarray(x, dtype=np.float32)


def _stream_span(container, stream) -> tuple[float, float]:
    """(start, duration) of a video stream in seconds; scans packet timestamps when headers lack it."""
    import av

    tb = float(stream.time_base)
    start = stream.start_time * tb if stream.start_time is not None else 0.0
    if stream.duration:
        return start, stream.duration * tb
    if container.duration:
        return start, container.duration / av.time_base
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end or 0.0, (packet.pts + (packet.duration or 0)) * tb)
    container.seek(0)
    if end is None:
        raise DecodeError("video has no timestamps")
    return start, end - start


def load_video_frames(path, k: int, window: tuple[float, float] | None = None) -> list["PIL.Image.Image"]:
    """Take ``k`` RGB frames at ``t_i = (i + 0.5) * duration / k`` (segment middles), deterministically.

    For each target time the frame shown at that time is kept (the last frame whose timestamp is not
    later); targets past the last decodable frame get the last frame. With ``window`` the times lie
    inside ``(start_s, end_s)`` and decoding starts from a seek to the window.
    """
    import av

    path = _check_file(path)
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            if window is not None:
                if not (0 <= window[0] < window[1]):
                    raise DecodeError(f"invalid window {window}")
                t0, duration = window
                duration -= t0
                if t0 > 0:
                    container.seek(int(t0 / float(stream.time_base)), stream=stream, backward=True)
            else:
                t0, duration = _stream_span(container, stream)
            targets = [t0 + (i + 0.5) * duration / k for i in range(k)]
            chosen, prev, j = [], None, 0
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    continue
                while j < k and t > targets[j] + 1e-6:
                    chosen.append(prev if prev is not None else frame)
                    j += 1
                if j == k:
                    break
                prev = frame
            if prev is None and not chosen:
                raise DecodeError("no decodable video frames")
            chosen += [prev] * (k - len(chosen))
            return [f.to_image() for f in chosen]
    except av.FFmpegError as err:
        raise DecodeError(f"undecodable video ({_reason(err, path)})") from None


def load_text(source) -> str:
    """A text modality: a ``str`` is the text itself; a ``Path`` is a text file read in the worker.

    Files that are not valid UTF-8 (MVSA's tweets, for one) are read as Latin-1 rather than refused.
    """
    if isinstance(source, (Path, os.PathLike)):
        path = _check_file(source)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    elif isinstance(source, str):
        text = source
    else:
        raise DecodeError(f"text source must be str or Path, got {type(source).__name__}")
    text = text.strip()
    if not text:
        raise DecodeError("empty text")
    return text


AUDIO_RATE = 16000


def decode_source(kind: str, source, window, frames: int):
    """One source of one modality -> the decoded input a preprocessor takes (raises DecodeError)."""
    if kind == "image":
        return load_image(source)
    if kind == "audio":
        return load_audio(source, AUDIO_RATE, window)
    if kind == "video":
        return load_video_frames(source, frames, window)
    return load_text(source)
