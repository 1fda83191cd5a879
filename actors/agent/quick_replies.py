"""Quick replies: phrases said again and again (a greeting, "let me check",
"sorry, I couldn't hear that", the safe reply) synthesised once per voice
and played from a cache, with no TTS call.

Two layers: an in-memory LRU bounded in bytes (per process: one session
actor, or an ingress replica), and a directory of WAV files with a size cap
shared by every process on the machine, written atomically (temp file +
rename) so a reader never sees half a file. The key is (TTS provider,
voice, sample rate, phrase): a phrase in another voice is another entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import tempfile
import unicodedata
import wave
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # at run time imported where used: actors/config.py imports this module's config model
    from actors.providers.base import TTS, AudioSegment

log = logging.getLogger(__name__)

MAX_PHRASE_CHARS = 200
_SQUASH = re.compile(r"[\W_]+")


def normalize_phrase(text: str) -> str:
    """Equal but for case, width, blanks and punctuation: how a sentence is matched to a phrase."""
    return _SQUASH.sub("", unicodedata.normalize("NFKC", text).casefold())


class LanguagePhrases(BaseModel):
    """The filler and error phrases of one language (a persona's `language`)."""

    model_config = ConfigDict(extra="forbid")
    fillers: list[str] = []
    errors: list[str] = []


class QuickRepliesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    cache_dir: str | None = "data/tts-cache"
    """WAV files of synthesised phrases (relative to the project root); None: memory only."""
    memory_bytes: int = Field(8 * 1024 * 1024, ge=0)
    disk_bytes: int = Field(64 * 1024 * 1024, ge=0)
    greeting: bool = True
    """The persona's greeting is a quick reply."""
    safe_reply: bool = True
    """The persona's safe reply (moderation) is a quick reply."""
    fillers: list[str] = ["Let me check.", "One moment, please."]
    """Said (in turn) when a reply that has said nothing yet waits for its tool calls."""
    filler_after_ms: int = Field(700, ge=0, le=10_000)
    """How long those tool calls may run before the filler is said (a quick
    tool needs none); 0: at once."""
    errors: list[str] = ["Sorry, something went wrong. Please try again.", "Sorry, I couldn't hear that."]
    """The first is said when a turn fails with nothing said (the language model failed, no fallback left)."""
    languages: dict[str, LanguagePhrases] = {
        "zh": LanguagePhrases(fillers=["我查一下。", "请稍等。"],
                              errors=["抱歉，出了点问题，请再试一次。", "抱歉，我没听清。"]),
    }
    """Language (a persona's `language`, `zh-CN` → `zh`) → its own fillers and errors."""
    phrases: list[str] = []
    """Any other phrase said often."""
    personas: dict[str, list[str]] = {}
    """Persona id → more phrases of that persona."""

    def _language(self, persona: Any) -> LanguagePhrases | None:
        language = str(getattr(persona, "language", "") or "").split("-")[0].lower()
        return self.languages.get(language)

    def fillers_for(self, persona: Any = None) -> list[str]:
        own = self._language(persona)
        return [p for p in (own.fillers if own and own.fillers else self.fillers) if len(p) <= MAX_PHRASE_CHARS]

    def errors_for(self, persona: Any = None) -> list[str]:
        own = self._language(persona)
        return [p for p in (own.errors if own and own.errors else self.errors) if len(p) <= MAX_PHRASE_CHARS]

    def phrases_for(self, persona: Any = None) -> list[str]:
        """Every phrase of this persona (duck-typed: `id`, `language`, `greeting_text()`, `safe_reply_text()`)."""
        out = [*self.fillers_for(persona), *self.errors_for(persona), *self.phrases]
        if persona is not None:
            out += self.personas.get(getattr(persona, "id", ""), [])
            if self.greeting and hasattr(persona, "greeting_text"):
                out.append(persona.greeting_text())
            if self.safe_reply and hasattr(persona, "safe_reply_text"):
                out.append(persona.safe_reply_text())
        return [p for p in out if p and len(p) <= MAX_PHRASE_CHARS]


@dataclass(frozen=True)
class VoiceKey:
    provider: str
    voice: str = ""
    sample_rate: int = 0
    """0: the voice's own rate (a piper voice has one)."""


def voice_key(tts: Any, provider: str | None = None, voice: str | None = None,
              sample_rate: int | None = None) -> VoiceKey:
    """The key of `tts`'s voice: given parts win; else a failover chain's
    primary link name, a provider's `label`, `voice` and `sample_rate`."""
    chain = getattr(tts, "chain", None)
    inner = chain.links[0].provider if chain is not None else tts
    name = provider or (chain.links[0].name if chain is not None else getattr(tts, "label", type(tts).__name__))
    cfg = getattr(inner, "config", None)
    v = voice if voice is not None else str(getattr(inner, "voice", None) or getattr(cfg, "voice", "") or "")
    rate = sample_rate if sample_rate is not None else getattr(inner, "sample_rate", 0)
    return VoiceKey(str(name), v, rate if isinstance(rate, int) else 0)


def _served_by_primary(tts: Any) -> bool:
    """A failover chain answered with its first voice (a fallback voice's audio must not be kept)."""
    chain = getattr(tts, "chain", None)
    return chain is None or chain.served_by in (None, chain.links[0].name)


def _to_wav(segment: AudioSegment) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(segment.sample_rate)
        w.writeframes(segment.pcm16)
    return buf.getvalue()


def _from_wav(data: bytes) -> AudioSegment:
    from actors.providers.base import AudioSegment

    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError("not PCM16 mono")
        return AudioSegment(w.readframes(w.getnframes()), w.getframerate())


class _DiskLayer:
    """WAV files named by the key's hash, under a byte cap (oldest use out first)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.wav"

    def read(self, digest: str) -> AudioSegment | None:
        p = self.path(digest)
        try:
            data = p.read_bytes()
            os.utime(p)  # its use counts for eviction
            return _from_wav(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, wave.Error) as e:  # a damaged file: drop it, synthesise again
            log.warning("quick-reply cache: unreadable %s (%s); removed", p.name, e)
            p.unlink(missing_ok=True)
            return None

    def write(self, digest: str, segment: AudioSegment) -> None:
        data = _to_wav(segment)
        if len(data) > self.max_bytes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".wav")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict()

    def _evict(self) -> None:
        files = []
        for p in self.dir.glob("*.wav"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


class QuickReplyCache:
    """Synthesised phrases by (voice, text): memory LRU, then disk, then the TTS."""

    def __init__(self, directory: str | Path | None = None, memory_bytes: int = 8 * 1024 * 1024,
                 disk_bytes: int = 64 * 1024 * 1024) -> None:
        self._memory: OrderedDict[str, AudioSegment] = OrderedDict()
        self._memory_bytes = memory_bytes
        self._used = 0
        self._disk = _DiskLayer(Path(directory), disk_bytes) if directory is not None and disk_bytes > 0 else None
        self._inflight: dict[str, asyncio.Future[AudioSegment]] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "synthesized": 0}

    @classmethod
    def from_config(cls, config: QuickRepliesConfig, resolve: Any = None) -> QuickReplyCache:
        """`resolve` maps a configured path to a real one (AppConfig.resolve_path)."""
        directory = None
        if config.cache_dir:
            directory = resolve(config.cache_dir) if resolve else Path(config.cache_dir)
        return cls(directory, config.memory_bytes, config.disk_bytes)

    @staticmethod
    def digest(key: VoiceKey, text: str) -> str:
        raw = "\x1f".join((key.provider, key.voice, str(key.sample_rate), text))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    async def get(self, key: VoiceKey, text: str) -> AudioSegment | None:
        digest = self.digest(key, text)
        if (seg := self._memory.get(digest)) is not None:
            self._memory.move_to_end(digest)
            self.stats["memory_hits"] += 1
            return seg
        if self._disk is not None and (seg := await asyncio.to_thread(self._disk.read, digest)) is not None:
            self.stats["disk_hits"] += 1
            self._remember(digest, seg)
            return seg
        return None

    async def put(self, key: VoiceKey, text: str, segment: AudioSegment) -> None:
        digest = self.digest(key, text)
        self._remember(digest, segment)
        if self._disk is not None:
            try:
                await asyncio.to_thread(self._disk.write, digest, segment)
            except OSError as e:  # a full or read-only disk: memory still serves
                log.warning("quick-reply cache: could not write to %s: %s", self._disk.dir, e)

    async def get_or_synthesize(self, tts: TTS, text: str, key: VoiceKey | None = None) -> AudioSegment:
        """The phrase's audio in `tts`'s voice; synthesised (once, even when
        asked for at the same time) only when no layer has it."""
        key = key or voice_key(tts)
        digest = self.digest(key, text)
        # the in-flight check comes before any await: a caller that looked in the disk layer
        # while the first one synthesised would otherwise miss both and synthesise again
        if (pending := self._inflight.get(digest)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AudioSegment] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            if (seg := await self.get(key, text)) is None:
                seg = await tts.synthesize(text)
                self.stats["synthesized"] += 1
                if seg.pcm16 and _served_by_primary(tts):
                    await self.put(key, text, seg)
            future.set_result(seg)
            return seg
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: a lone caller's failure is not "never retrieved"
            raise
        finally:
            self._inflight.pop(digest, None)

    def _remember(self, digest: str, segment: AudioSegment) -> None:
        size = len(segment.pcm16)
        if size > self._memory_bytes:
            return
        old = self._memory.pop(digest, None)
        if old is not None:
            self._used -= len(old.pcm16)
        self._memory[digest] = segment
        self._used += size
        while self._used > self._memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._used -= len(dropped.pcm16)

    @property
    def memory_used(self) -> int:
        return self._used


class QuickReplies:
    """A session's quick replies: its phrases, matched by normalised text,
    and the cache that holds their audio in its voice."""

    def __init__(self, phrases: Iterable[str], cache: QuickReplyCache, key: VoiceKey | None = None, *,
                 fillers: Iterable[str] = (), errors: Iterable[str] = (), filler_after_ms: int = 0) -> None:
        self._by_norm: dict[str, str] = {}
        self.fillers = list(fillers)
        self.errors = list(errors)
        self.filler_after_s = filler_after_ms / 1000.0
        for p in [*phrases, *self.fillers, *self.errors]:
            self.add(p)
        self.cache = cache
        self.key = key
        self.hits = 0

    def filler(self, n: int) -> str | None:
        """The n-th use's filler ("let me check"), in turn; None when there are none."""
        return self.fillers[n % len(self.fillers)] if self.fillers else None

    def error(self) -> str | None:
        """What a failed turn says ("sorry, something went wrong"); None when none is configured."""
        return self.errors[0] if self.errors else None

    def match(self, sentence: str) -> str | None:
        """The configured phrase this sentence is, or None."""
        if len(sentence) > MAX_PHRASE_CHARS * 2:
            return None
        return self._by_norm.get(normalize_phrase(sentence))

    def add(self, phrase: str) -> None:
        if (n := normalize_phrase(phrase)) and len(phrase) <= MAX_PHRASE_CHARS:
            self._by_norm.setdefault(n, phrase)

    async def audio(self, tts: TTS, phrase: str) -> AudioSegment:
        return await self.cache.get_or_synthesize(tts, phrase, self.key)

    async def prefetch(self, tts: TTS) -> None:
        """Synthesise every phrase not cached yet (at start, off the reply path)."""
        for phrase in list(self._by_norm.values()):
            try:
                await self.audio(tts, phrase)
            except Exception as e:  # a phrase that cannot be said now is synthesised on first use
                log.warning("quick-reply prefetch failed for a phrase: %s", type(e).__name__)


_SHARED: dict[tuple[Any, ...], QuickReplyCache] = {}


def shared_cache(config: QuickRepliesConfig, resolve: Any = None) -> QuickReplyCache:
    """One cache per process and configuration, so the sessions of a
    process share its memory layer."""
    k = (config.cache_dir, config.memory_bytes, config.disk_bytes,
         str(resolve(config.cache_dir)) if resolve and config.cache_dir else None)
    if k not in _SHARED:
        _SHARED[k] = QuickReplyCache.from_config(config, resolve)
    return _SHARED[k]


def voice_key_from_config(config: Any, persona: Any = None) -> VoiceKey:
    """The session's voice from its configuration (AppConfig): the provider
    named in `tts.provider`, the persona's voice for it, else the configured
    one (`tts.voice_model`, or the vendor section's `voice`/`model`), and
    the vendor section's `sample_rate` if it sets one."""
    provider = config.tts.provider
    section = (config.tts.model_extra or {}).get(provider.split("-")[0]) or {}
    if not isinstance(section, dict):
        section = {}
    voices = getattr(persona, "voices", None) or {}
    voice = voices.get(provider) or config.tts.voice_model or "/".join(
        str(section[k]) for k in ("model", "voice") if section.get(k))
    rate = section.get("sample_rate", 0)
    return VoiceKey(provider, voice or "", rate if isinstance(rate, int) else 0)


def build_quick_replies(app_config: Any, persona: Any = None) -> QuickReplies | None:
    """A session's quick replies from `AppConfig.quick_replies` (None when
    off or not configured): the persona's phrases, this process's shared
    cache, and the session's voice as the key."""
    config = getattr(app_config, "quick_replies", None)
    if not isinstance(config, QuickRepliesConfig) or not config.enabled:
        return None
    resolve = getattr(app_config, "resolve_path", None)
    return QuickReplies(config.phrases_for(persona), shared_cache(config, resolve),
                        voice_key_from_config(app_config, persona), fillers=config.fillers_for(persona),
                        errors=config.errors_for(persona), filler_after_ms=config.filler_after_ms)
