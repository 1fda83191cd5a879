"""The command line, run for real against the test cluster (docs/notebook.ipynb:
tests/test_notebook.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from actors.audio import read_wav, rms_dbfs
from tests.conftest import TEST_NAMESPACE

ROOT = Path(__file__).resolve().parent.parent


def _env(address: str = "auto") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "VOICE_ACTORS__SERVER__NAMESPACE": TEST_NAMESPACE,
            "RAY_ADDRESS": address}


def test_cli_turn_from_a_wav_file(ray_cluster, cluster_address, tmp_path: Path):
    cli = [sys.executable, "-m", "actors.cli"]
    said = subprocess.run([*cli, "say", "What is twelve times seven?", "-o", "q.wav"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stderr[-2000:]
    out = subprocess.run([*cli, "turn", "q.wav", "-o", "reply.wav", "--address", cluster_address], cwd=tmp_path,
                         env=_env(cluster_address), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert "12" in lines["transcript"] and "84" in lines["reply"]
    assert "first_audio_ms=" in lines["timings"] and "stt_final_ms=" in lines["timings"]
    reply = read_wav(tmp_path / "reply.wav")
    assert len(reply) > 16000 and rms_dbfs(reply) > -35


def test_cli_rejects_a_file_that_is_not_wav(tmp_path: Path):
    (tmp_path / "x.wav").write_bytes(b"not audio at all")
    out = subprocess.run([sys.executable, "-m", "actors.cli", "turn", "x.wav"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a readable WAV" in out.stderr
