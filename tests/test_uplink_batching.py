"""The ingress's uplink batching (actors/ingress/connection.py), without Ray
or a socket: audio goes to the session in `ingress.uplink_batch_ms` batches,
except between the session's `vad.speech_start` and its `vad.speech_end`,
where the end of speech is being decided and every frame goes at once (the
frame that completes the VAD's end silence used to wait for its batch:
docs/benchmarks.md, "Server overhead")."""

from __future__ import annotations

from typing import Any

from actors.config import load_config
from actors.events import SpeechEnd, SpeechStart, STTFinal
from actors.ingress.connection import VoiceConnection
from actors.protocols.base import Audio

FRAME = b"\x00\x01" * 960  # 60 ms of 16 kHz PCM16


def connection() -> VoiceConnection:
    config = load_config(env={"VOICE_ACTORS__INGRESS__UPLINK_BATCH_MS": "120"})

    async def no_session(*_: Any) -> Any:
        raise AssertionError("not opened in this test")

    return VoiceConnection(ws=None, adapter=None, open_session=no_session, config=config)  # type: ignore[arg-type]


def audio_calls(conn: VoiceConnection) -> list[int]:
    """Frames in each `send_audio` call queued so far (and empties the queue)."""
    out = []
    while not conn._calls.empty():
        method, args = conn._calls.get_nowait()
        assert method == "send_audio"
        out.append(len(args[0]))
    return out


async def test_audio_is_batched_outside_an_utterance_and_sent_frame_by_frame_within_one() -> None:
    conn = connection()
    for _ in range(4):
        await conn._dispatch(Audio(FRAME))
    assert audio_calls(conn) == [2, 2]  # 120 ms batches of 60 ms frames

    conn._track(SpeechStart(turn_id=1, stream_ms=600))
    for _ in range(3):
        await conn._dispatch(Audio(FRAME))
    assert audio_calls(conn) == [1, 1, 1]

    conn._track(SpeechEnd(turn_id=1, stream_ms=2400))
    for _ in range(4):
        await conn._dispatch(Audio(FRAME))
    assert audio_calls(conn) == [2, 2]
    # sequence numbers run on across both ways of sending: the session sees every frame once, in order
    assert conn._seq == 11

    # a final transcript ends the window too (a session without a live VAD end event)
    conn._track(SpeechStart(turn_id=2, stream_ms=3600))
    conn._track(STTFinal(turn_id=2, text="hello"))
    await conn._dispatch(Audio(FRAME))
    assert audio_calls(conn) == []  # waiting for its pair
