"""Sentence splitting and PCM helpers (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.audio import AudioFormatError, read_wav, resample_pcm16, split_frames, wav_bytes
from actors.text import SentenceSplitter, split_sentences


def test_splits_english_and_chinese_punctuation():
    assert split_sentences("Hello there! It is 3.5 degrees. 你好。今天天气很好！好吗？And you?") == [
        "Hello there!", "It is 3.5 degrees.", "你好。", "今天天气很好！", "好吗？", "And you?"]


def test_streamed_text_yields_a_sentence_as_soon_as_it_ends():
    s = SentenceSplitter()
    assert s.feed("It is 3") == []
    assert s.feed(".5 now. Next") == ["It is 3.5 now."]
    assert s.feed(" one") == []
    assert s.flush() == ["Next one"]


def test_long_first_sentence_is_cut_at_a_clause_for_fast_first_audio():
    text = ("The Rosetta Stone is a granite-like slab carved in 196 BC with a priestly decree, "
            "written in three scripts. It is in Gallery 1.")
    pieces = split_sentences(text)
    assert pieces[0].endswith("decree,") and pieces[1] == "written in three scripts."
    assert " ".join(pieces) == text


def test_long_first_sentence_without_an_early_clause_is_cut_before_a_phrase():
    text = ("The Rosetta Stone is a granite-like slab carved in 196 BC with a priestly decree honouring King "
            "Ptolemy the Fifth, written in three scripts. It is in Gallery 1.")
    assert split_sentences(text)[:2] == [
        "The Rosetta Stone is a granite-like slab carved in 196 BC",
        "with a priestly decree honouring King Ptolemy the Fifth, written in three scripts."]
    streamed, s = [], SentenceSplitter()  # the same, word by word as an LLM streams it
    for word in text.split(" "):
        streamed += s.feed(word + " ")
    assert streamed[0] == "The Rosetta Stone is a granite-like slab carved in 196 BC"
    assert " ".join(streamed + s.flush()) == text
    # no phrase-starting word: the clause boundary, however late, is still the cut
    odd = "Xylophones xylophones " * 6 + "xylophones, then more. Next."
    assert split_sentences(odd)[0].endswith("xylophones,")
    # only the first piece is cut this way
    assert split_sentences("Yes. " + text)[1] == text.split(" It is")[0]


def test_wav_round_trip_resamples_and_downmixes():
    t = np.arange(22050) / 22050
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    stereo = np.stack([tone, tone], axis=1).tobytes()
    import io
    import wave
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(stereo)
    pcm = read_wav(buf.getvalue())
    assert len(pcm) == 2 * 16000
    assert read_wav(wav_bytes(pcm, 16000)) == pcm
    assert len(resample_pcm16(pcm, 16000, 8000)) == 2 * 8000
    assert [len(f) for f in split_frames(pcm, 60)][:2] == [1920, 1920]


def test_unreadable_wav_is_a_format_error():
    with pytest.raises(AudioFormatError):
        read_wav(b"RIFF not really a wav")
