"""Moderation: a pre-check on what the user said and a post-check on each
sentence before it is spoken.

Local rules (word lists, patterns) cost microseconds and run on every text;
an optional OpenAI-compatible `/v1/moderations` endpoint runs after them.
What was blocked is logged with a category and a short keyed hash, never
the text: the log must not become a store of what people said. The hash key
is derived from the deployment's signing secret (`auth.jwt_secret`, kept in
`auth.secrets_file`), so every session and replica of a deployment hashes
alike and an operator can see two blocks were the same text; without one it
is random per process.

Word matching folds case and width (NFKC, so full-width `ＢＡＤ` is `bad`)
and drops zero-width characters. A word whose end is a Latin/Greek/Cyrillic
letter or digit must end at a word boundary there ("ass" does not block
"class"); CJK has no spaces between words, so a CJK word matches anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # imported where used: httpx (and the rich/click it pulls in) costs a session process ~5 MB
    import httpx

log = logging.getLogger(__name__)

MAX_WORDS = 10_000
MAX_WORD_CHARS = 100
MAX_PATTERNS = 200
MAX_PATTERN_CHARS = 500
MAX_SCAN_CHARS = 8000
"""Rules see at most this much of a text (a session's text is capped at 4000)."""
DEFAULT_SAFE_REPLY = "I'd rather not talk about that. Let's talk about something else."
_PROCESS_KEY = secrets.token_bytes(16)
"""The hash key when the deployment has no signing secret: shared by this process's sessions."""

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_WORD_CHAR = re.compile(r"[0-9a-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]")
_BOUNDARY = r"[0-9a-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]"


def fold(text: str) -> str:
    """Case- and width-folded, zero-width characters gone: what rules match against."""
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold()


class PatternRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(max_length=MAX_PATTERN_CHARS)
    """A Python regular expression, matched against the folded text (case-insensitive)."""
    category: str = Field("pattern", max_length=64)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class ModerationAPIConfig(BaseModel):
    """An OpenAI-compatible moderation endpoint: `POST {base_url}/moderations`."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = "https://api.openai.com/v1"
    model: str = "omni-moderation-latest"
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the key; None sends no Authorization header."""
    timeout_s: float = Field(2.0, gt=0, le=30)
    on_error: Literal["allow", "block"] = "allow"
    """When the endpoint fails or times out: `allow` (fail open: a moderation
    outage must not silence the assistant) or `block` (fail closed)."""
    categories: list[str] | None = None
    """Block only when one of these categories is flagged; None: whenever `flagged`."""
    check_user: bool = True
    check_sentences: bool = True
    """Each spoken sentence waits for the endpoint before synthesis: turn it off if its latency hurts."""


class ModerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    """With no words, patterns or API configured, nothing is blocked either way."""
    blocked_words: dict[str, list[str]] = {}
    """Category → words or phrases; a plain list is category `blocked_word`."""
    patterns: list[PatternRule] = Field([], max_length=MAX_PATTERNS)
    """Regular expressions (a plain string is category `pattern`)."""
    api: ModerationAPIConfig | None = None
    safe_reply: str | None = Field(None, min_length=1, max_length=500)
    """Said instead of a blocked message or reply sentence when the persona
    has no `safe_reply` of its own; None: the persona's default, in its language."""

    @field_validator("blocked_words", mode="before")
    @classmethod
    def _word_list(cls, v: Any) -> Any:
        return {"blocked_word": v} if isinstance(v, list) else v

    @field_validator("blocked_words")
    @classmethod
    def _bounded_words(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if sum(len(words) for words in v.values()) > MAX_WORDS:
            raise ValueError(f"at most {MAX_WORDS} blocked words")
        for words in v.values():
            if any(len(w) > MAX_WORD_CHARS for w in words):
                raise ValueError(f"a blocked word is longer than {MAX_WORD_CHARS} characters")
        return v

    @field_validator("patterns", mode="before")
    @classmethod
    def _pattern_list(cls, v: Any) -> Any:
        return [{"pattern": p} if isinstance(p, str) else p for p in v] if isinstance(v, list) else v


@dataclass(frozen=True)
class Verdict:
    blocked: bool = False
    category: str | None = None
    source: Literal["words", "pattern", "api", "api_error"] | None = None
    digest: str = ""
    """A short keyed hash of the text: lets an operator see that two blocks
    were the same text, and nothing more."""

    @property
    def allowed(self) -> bool:
        return not self.blocked


ALLOWED = Verdict()


def _word_regex(words: list[str]) -> re.Pattern[str] | None:
    """One alternation for a category, longest first; a boundary lookaround
    only on an end that is a word character of a spaced script."""
    parts = []
    for word in sorted({fold(w).strip() for w in words if w.strip()}, key=len, reverse=True):
        body = re.escape(word)
        if _WORD_CHAR.match(word[0]):
            body = f"(?<!{_BOUNDARY})" + body
        if _WORD_CHAR.match(word[-1]):
            body += f"(?!{_BOUNDARY})"
        parts.append(body)
    return re.compile("|".join(parts)) if parts else None


class Moderator:
    """Checks text against the configured rules and endpoint.

    `check_user(text)`: before the LLM sees a user's words. `check_sentence(text)`:
    before a reply's sentence is synthesised. Both never raise: an endpoint
    failure is `api.on_error`'s verdict."""

    def __init__(self, config: ModerationConfig, client: httpx.AsyncClient | None = None,
                 api_cache_size: int = 256, key: bytes | None = None) -> None:
        self.config = config
        self._words = [(cat, rx) for cat, words in config.blocked_words.items()
                       if (rx := _word_regex(words)) is not None]
        self._patterns = [(p.category, re.compile(p.pattern, re.IGNORECASE)) for p in config.patterns]
        self._client = client
        self._own_client = client is None
        self._key = key or _PROCESS_KEY
        self._api_cache: OrderedDict[str, Verdict] = OrderedDict()
        self._api_cache_size = api_cache_size
        self.blocked = 0
        self.api_errors = 0

    @property
    def active(self) -> bool:
        """Whether any check can block: sessions skip the work when not."""
        return self.config.enabled and bool(self._words or self._patterns or self.config.api)

    @property
    def safe_reply(self) -> str:
        return self.config.safe_reply or DEFAULT_SAFE_REPLY

    def digest(self, text: str) -> str:
        return hashlib.blake2b(text.encode(), key=self._key, digest_size=6).hexdigest()

    def check_rules(self, text: str) -> Verdict:
        """The local rules alone (synchronous, microseconds)."""
        if not self.config.enabled or not text:
            return ALLOWED
        folded = fold(text[:MAX_SCAN_CHARS])
        for category, rx in self._words:
            if rx.search(folded):
                return Verdict(True, category, "words", self.digest(text))
        for category, rx in self._patterns:
            if rx.search(folded):
                return Verdict(True, category, "pattern", self.digest(text))
        return ALLOWED

    async def check_user(self, text: str) -> Verdict:
        return self._logged("user text", await self._check(text, api=bool(self.config.api and self.config.api.check_user)))

    async def check_sentence(self, text: str) -> Verdict:
        return self._logged("reply sentence", await self._check(text, api=self._api_for_sentences))

    def check_sentence_now(self, text: str) -> Verdict | None:
        """`check_sentence` without waiting when only local rules apply (the
        reply's text goes on at once); None when the endpoint must be asked."""
        return None if self._api_for_sentences else self._logged("reply sentence", self.check_rules(text))

    async def screen_user(self, text: str) -> Verdict:
        """`check_user`'s verdict, neither logged nor counted: for words that
        may not be the user's last (preemptive generation), whose final
        transcript gets its own `check_user`."""
        return await self._check(text, api=bool(self.config.api and self.config.api.check_user))

    @property
    def _api_for_sentences(self) -> bool:
        return bool(self.config.api and self.config.api.check_sentences)

    async def _check(self, text: str, api: bool) -> Verdict:
        verdict = self.check_rules(text)
        if verdict.blocked or not api or not self.config.enabled or not text.strip():
            return verdict
        return await self._ask_api(text)

    def _logged(self, what: str, verdict: Verdict) -> Verdict:
        if verdict.blocked:
            self.blocked += 1
            log.warning("moderation blocked a %s: category=%s source=%s hash=%s",
                        what, verdict.category, verdict.source, verdict.digest)
        return verdict

    # ------------------------------------------------------------ endpoint
    async def _ask_api(self, text: str) -> Verdict:
        api = self.config.api
        assert api is not None
        digest = self.digest(text)
        if (cached := self._api_cache.get(digest)) is not None:
            self._api_cache.move_to_end(digest)
            return cached
        headers = {}
        if api.api_key_env and (key := os.environ.get(api.api_key_env)):
            headers["Authorization"] = f"Bearer {key}"
        try:
            client = self._http()
            response = await client.post(f"{api.base_url.rstrip('/')}/moderations", headers=headers,
                                         json={"model": api.model, "input": text[:MAX_SCAN_CHARS]},
                                         timeout=api.timeout_s)
            response.raise_for_status()
            verdict = self._read(response.json(), digest)
        except Exception as e:  # an outage: the configured side, never an exception into the reply
            self.api_errors += 1
            import httpx

            why = f"HTTP {e.response.status_code}" if isinstance(e, httpx.HTTPStatusError) else type(e).__name__
            log.warning("moderation endpoint failed (%s); %s", why,
                        "blocking" if api.on_error == "block" else "allowing")
            if api.on_error == "block":
                return Verdict(True, "moderation_unavailable", "api_error", digest)
            return ALLOWED
        self._api_cache[digest] = verdict
        if len(self._api_cache) > self._api_cache_size:
            self._api_cache.popitem(last=False)
        return verdict

    def _read(self, body: dict[str, Any], digest: str) -> Verdict:
        results = body.get("results") or []
        if not results or not isinstance(results[0], dict):
            raise ValueError("moderation answer without results")
        result = results[0]
        flagged = [name for name, on in (result.get("categories") or {}).items() if on]
        wanted = self.config.api.categories if self.config.api else None
        if wanted is not None:
            hits = [c for c in flagged if c in wanted]
            return Verdict(True, hits[0], "api", digest) if hits else ALLOWED
        if result.get("flagged"):
            return Verdict(True, flagged[0] if flagged else "flagged", "api", digest)
        return ALLOWED

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None


def hash_key(app_config: Any) -> bytes | None:
    """The log hash's key, derived one-way from the deployment's signing
    secret (never the secret itself, never logged); None when there is none."""
    secret = getattr(getattr(app_config, "auth", None), "jwt_secret", None)
    if secret is None or not hasattr(secret, "get_secret_value"):
        return None
    return hashlib.blake2b(secret.get_secret_value().encode(), digest_size=16, person=b"va-moderation").digest()


def build_moderator(app_config: Any) -> Moderator | None:
    """The session's moderator from `AppConfig.moderation`, or None when
    moderation is off, has nothing to check, or the app config has no such
    section yet."""
    config = getattr(app_config, "moderation", None)
    if not isinstance(config, ModerationConfig):
        return None
    moderator = Moderator(config, key=hash_key(app_config))
    return moderator if moderator.active else None


def safe_reply_for(persona: Any, moderator: Moderator | None) -> str:
    """What a block says: the persona's own `safe_reply`, else the configured
    `moderation.safe_reply`, else the persona's default in its language."""
    own = getattr(persona, "safe_reply", None)
    if own:
        return str(own)
    if moderator is not None and moderator.config.safe_reply:
        return moderator.config.safe_reply
    return str(persona.safe_reply_text()) if hasattr(persona, "safe_reply_text") else DEFAULT_SAFE_REPLY
