"""Push-to-talk recordings, trimmed or not: what Whisper hears.

A person holding a button leaves silence before and after their words. The
session (actors/audio_buffer.py, `listen` manual mode) now checks the
recording for speech and cuts the silence around it before recognition. This
measures what that changes, with the embedded models and no Ray:

- baseline: the whole recording to the STT, as the session did before;
- ours: the same recording through a real SessionCore in manual mode.

    python -m bench.ptt_trim [--lead-ms 2000] [--tail-ms 2000] [--noise-db -50]

Prints word error rate, hallucinations on silent recordings and STT time for
both, from the same recordings in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "What is twelve times seven?",
    "Tell me about the Rosetta Stone.",
    "What time does the museum open on Sunday?",
    "Remember that my locker number is forty two.",
    "How old is the Terracotta Army?",
    "Set a timer for three minutes.",
    "Where can I find the Egyptian collection?",
    "What is the date today?",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(ref: str, hyp: str) -> int:
    """Levenshtein distance over words."""
    r, h = words(ref), words(hyp)
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1]


def noise(ms: int, db: float, rng: np.random.Generator) -> bytes:
    n = 16000 * ms // 1000
    if db <= -120:
        return b"\x00\x00" * n
    x = rng.normal(0, 10 ** (db / 20), n)
    return np.clip(x * 32768, -32768, 32767).astype("<i2").tobytes()


async def through_session(config, stt, tts, pcm: bytes) -> tuple[str | None, float]:
    """One push-to-talk recording through SessionCore in manual mode → (transcript or None, seconds)."""
    from actors.audio import split_frames
    from actors.events import ErrorEvent, STTFinal
    from actors.providers import build_vad
    from actors.providers.base import LLM
    from actors.session_core import SessionCore

    class NoReply(LLM):
        async def stream(self, messages, tools):  # type: ignore[no-untyped-def]
            return
            yield

    core = SessionCore("ptt", config, vad=build_vad(config), stt=stt, llm=NoReply(), tts=tts)
    core.start()
    q = core.subscribe()
    core.listen("start", "manual")
    frames = [(i, f) for i, f in enumerate(split_frames(pcm, 60))]
    for i in range(0, len(frames), 10):  # as the ingress sends them: batches, not one call per recording
        core.send_audio(frames[i:i + 10], 16000, "s")
    started = time.perf_counter()
    core.listen("stop", "manual")
    result: str | None = None
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        if isinstance(ev, STTFinal):
            result = ev.text
            break
        if isinstance(ev, ErrorEvent):
            break
    took = time.perf_counter() - started
    await core.close()
    return result, took


async def main() -> None:
    from actors.audio import resample_pcm16
    from actors.config import load_config
    from actors.providers import build_stt, build_tts

    p = argparse.ArgumentParser()
    p.add_argument("--lead-ms", type=int, default=2000)
    p.add_argument("--tail-ms", type=int, default=2000)
    p.add_argument("--noise-db", type=float, default=-50.0, help="room noise level in dBFS (-120: digital silence)")
    p.add_argument("--silent", type=int, default=4, help="recordings with no speech at all")
    opts = p.parse_args()
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    stt, tts = build_stt(config.stt.provider, config), build_tts(config.tts.provider, config)
    rng = np.random.default_rng(7)
    base_err = ours_err = ref_words = 0
    base_s = ours_s = 0.0
    print(f"{'sentence':45s} | baseline (whole recording)        | ours (checked and trimmed)")
    for sentence in SENTENCES:
        seg = await tts.synthesize(sentence)
        speech = resample_pcm16(seg.pcm16, seg.sample_rate, 16000)
        speech_arr = np.frombuffer(speech, "<i2").astype(np.int32)
        def room(n: int) -> np.ndarray:
            return np.frombuffer(noise(n * 1000 // 16000 + 1, opts.noise_db, rng), "<i2")[:n].astype(np.int32)

        lead, tail = 16 * opts.lead_ms, 16 * opts.tail_ms
        rec = np.concatenate([room(lead), speech_arr + room(len(speech_arr)), room(tail)])
        pcm = np.clip(rec, -32768, 32767).astype("<i2").tobytes()
        t = time.perf_counter()
        base = await stt.transcribe(pcm)
        base_s += time.perf_counter() - t
        ours, took = await through_session(config, stt, tts, pcm)
        ours_s += took
        be, oe = word_errors(sentence, base), word_errors(sentence, ours or "")
        base_err, ours_err, ref_words = base_err + be, ours_err + oe, ref_words + len(words(sentence))
        print(f"{sentence:45s} | {be} err: {base[:30]:30s} | {oe} err: {(ours or '')[:30]}")
    base_halluc = ours_halluc = 0
    for _ in range(opts.silent):
        pcm = noise(opts.lead_ms + opts.tail_ms, opts.noise_db, rng)
        base_halluc += bool(words(await stt.transcribe(pcm)))
        ours, _ = await through_session(config, stt, tts, pcm)
        ours_halluc += bool(ours and words(ours))
    n = len(SENTENCES)
    print(f"\nrecordings: {n} spoken + {opts.silent} silent; {opts.lead_ms} ms before, {opts.tail_ms} ms after, "
          f"room noise {opts.noise_db} dBFS")
    print(f"word error rate   baseline {base_err / ref_words:.3f}   ours {ours_err / ref_words:.3f}")
    print(f"silent recordings answered with words   baseline {base_halluc}/{opts.silent}   "
          f"ours {ours_halluc}/{opts.silent}")
    print(f"stt time per recording   baseline {base_s / n * 1000:.0f} ms   ours {ours_s / n * 1000:.0f} ms "
          f"(ours: listen stop → final transcript)")


if __name__ == "__main__":
    asyncio.run(main())
