"""The cloud providers with fixed, known latencies, for `--mode cloud-fake`.

The loopback fakes of the test suite (tests/fakes: DashScope's duplex
inference WebSocket for paraformer recognition and CosyVoice synthesis, an
OpenAI-compatible SSE server for Qwen) scripted with fixed delays, served
from a process of their own so the load generator's work never delays them.
The server talks to them with the real `dashscope` and `openai` SDKs,
unmodified; only the URLs and keys in its config point here.

Fixed latencies, on the critical path of a spoken turn:

* STT: the final transcript `stt_final_ms` after finish-task (the server sends
  finish-task when its VAD has decided the user stopped);
* LLM: the first SSE event `llm_first_token_ms` after the request, then one
  text delta every `llm_token_ms`; the first sentence is complete after
  `FIRST_SENTENCE_DELTAS` deltas;
* TTS: the first audio chunk `tts_first_audio_ms` after the text
  (continue-task), then a chunk every `tts_chunk_ms` (0: as fast as the
  socket takes them).

Protocol with the parent (`CloudFakes`): the child prints one JSON line with
its URLs; each `stats` line on its stdin is answered with one JSON line of
the latencies the fakes really delivered since the last `stats` (their own
clocks), and EOF ends it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-cloud-fake-0123456789"
TRANSCRIPT = "十二乘以七等于多少？"
REPLY_DELTAS = ["十二乘以七", "等于八十四。", "还有别的", "问题吗？"]
FIRST_SENTENCE_DELTAS = 2
"""Deltas up to and including the one that ends the first sentence ("。")."""
LONG_REPLY = "这是一个很长的回答，好让你有时间打断它。" * 8
TTS_MS_PER_CHAR = 50.0
TTS_CHUNK_MS = 100


@dataclass(frozen=True)
class CloudLatencies:
    stt_final_ms: float = 150.0
    llm_first_token_ms: float = 300.0
    llm_token_ms: float = 0.0
    tts_first_audio_ms: float = 200.0
    tts_chunk_ms: float = 0.0

    @property
    def llm_first_sentence_ms(self) -> float:
        return self.llm_first_token_ms + FIRST_SENTENCE_DELTAS * self.llm_token_ms

    @property
    def provider_time_ms(self) -> float:
        """End of speech → first audio if neither the server nor its VAD took
        any time: final transcript + first sentence of the reply + its first audio."""
        return self.stt_final_ms + self.llm_first_sentence_ms + self.tts_first_audio_ms

    def describe(self) -> dict[str, float]:
        return {**asdict(self), "llm_first_sentence_ms": self.llm_first_sentence_ms,
                "provider_time_ms": self.provider_time_ms}


# ---------------------------------------------------------------- parent side
class CloudFakes:
    """Runs the fakes in a child process: `with CloudFakes(lat) as f: f.dashscope_url, f.openai_base_url`."""

    def __init__(self, latencies: CloudLatencies) -> None:
        self.latencies = latencies
        self._proc: subprocess.Popen[str] | None = None
        self.dashscope_url = ""
        self.openai_base_url = ""

    def start(self) -> CloudFakes:
        lat = self.latencies
        cmd = [sys.executable, "-m", "bench.cloud_fakes", "--stt-final-ms", str(lat.stt_final_ms),
               "--llm-first-token-ms", str(lat.llm_first_token_ms), "--llm-token-ms", str(lat.llm_token_ms),
               "--tts-first-audio-ms", str(lat.tts_first_audio_ms), "--tts-chunk-ms", str(lat.tts_chunk_ms)]
        self._proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      bufsize=1)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the cloud fakes did not start")
        urls = json.loads(line)
        self.dashscope_url, self.openai_base_url = urls["dashscope_url"], urls["openai_base_url"]
        return self

    def stats(self) -> dict[str, Any]:
        """Latencies the fakes delivered since the last call (and forget them)."""
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(10)
        except Exception:  # noqa: BLE001 - never leave it behind
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def __enter__(self) -> CloudFakes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- child side
def _pct(values: list[float]) -> dict[str, Any]:
    import numpy as np

    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1)}


def _delivered(dashscope: Any, llm: Any) -> dict[str, Any]:
    """What the fakes really did, on their own clocks: finish-task → task-finished
    (ASR), request → first SSE event (LLM), text → first audio chunk (TTS)."""
    stt, tts, first = [], [], []
    for conn in list(dashscope.connections):
        for task in list(conn.tasks):
            if task.kind == "asr" and task.finish_requested_at and task.finished_at and not task.cancelled:
                stt.append((task.finished_at - task.finish_requested_at) * 1000)
            elif task.kind == "tts" and task.chunk_times:
                sent = [f.at for f in conn.frames if f.kind == "text" and '"continue-task"' in str(f.data)
                        and task.task_id in str(f.data)]
                if sent:
                    tts.append((task.chunk_times[0] - sent[0]) * 1000)
    for r in list(llm.requests):
        if r.first_chunk_at is not None:
            first.append((r.first_chunk_at - r.received_at) * 1000)
    return {"stt_final_ms": _pct(stt), "llm_first_token_ms": _pct(first), "tts_first_audio_ms": _pct(tts)}


def main(argv: list[str] | None = None) -> None:
    from tests.fakes.dashscope_server import AsrScript, FakeDashScope, TtsScript
    from tests.fakes.openai_server import FakeOpenAIServer, RecordedRequest, Script

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(CloudLatencies()).items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=default)
    p.add_argument("--interims-reach-end", type=int, default=1,
                   help="1: the last interim has every word, as paraformer's do once the speaker pauses "
                        "(a preemptive reply is kept); 0: interims lag (it is discarded)")
    args = vars(p.parse_args(argv))
    whole_interims = bool(args.pop("interims_reach_end"))
    lat = CloudLatencies(**args)

    asr = AsrScript(sentences=[TRANSCRIPT], interims_per_sentence=2, final_delay_s=lat.stt_final_ms / 1000,
                    interims_reach_end=whole_interims)
    tts = TtsScript(ms_per_char=TTS_MS_PER_CHAR, chunk_ms=TTS_CHUNK_MS, first_audio_delay_s=lat.tts_first_audio_ms / 1000,
                    chunk_delay_s=lat.tts_chunk_ms / 1000)
    short = Script.text(REPLY_DELTAS, first_token_s=lat.llm_first_token_ms / 1000, between_s=lat.llm_token_ms / 1000)
    long = Script.text([s + "。" for s in LONG_REPLY.split("。") if s], first_token_s=lat.llm_first_token_ms / 1000,
                       between_s=lat.llm_token_ms / 1000)

    def respond(request: RecordedRequest) -> Script:
        last = request.messages[-1].get("content") if request.messages else ""
        return long if "long" in str(last) else short

    dashscope = FakeDashScope(api_key=API_KEY, asr=asr, tts=tts).start()
    llm = FakeOpenAIServer(api_key=API_KEY, default=short).start_in_thread()
    llm.respond_with(respond)
    print(json.dumps({"dashscope_url": dashscope.url, "openai_base_url": llm.base_url}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(_delivered(dashscope, llm)), flush=True)
                dashscope.connections = []  # the scripts stay; only the records go
                llm.requests.clear()
    finally:
        llm.stop_thread()
        dashscope.stop()


if __name__ == "__main__":
    main()
