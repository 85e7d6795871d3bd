"""benchmarks/bench_extract_gpu.py: its --tiny run on the CPU (the same code as the GPU run), and its refusal."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_extract_gpu.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_tiny_run_prints_every_figure():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--workers", "1"], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("CLIP ViT-L/14", "Whisper large-v3 encoder", "LLaVA-1.5-7B", "x model alone", "x decode only",
                 "fast vs plain", "start-up: ", "window valid vs 30 s features", "json {"):
        assert line in out, out
    assert out.count("fast vs plain") == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA")
def test_refuses_in_one_line_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=ENV, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "CUDA" in lines[0] and "--tiny" in lines[0]
