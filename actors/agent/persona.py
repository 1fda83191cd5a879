"""Personas: who the assistant is in a session, and what that changes.

A persona is configuration, not code: one YAML file per persona in
`config/personas/` (the file name is its id) or inline under `personas:`.
It sets the system prompt and greeting, the language, a voice per TTS
provider, the LLM's temperature and reply length, the tools it may use and
its long-term memory policy. A session takes one at hello (native `persona`,
a device's stored persona, or the HTTP API) and keeps it across resumes.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PERSONA_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
MAX_PERSONA_FILE_BYTES = 64 * 1024


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = "default"
    name: str = "Ava"
    language: str = "en"
    """BCP-47-ish code (`en`, `zh`); the local dialogue engine speaks English only."""
    description: str = ""
    system_prompt: str = Field("You are Ava, a friendly museum guide. Answer briefly in spoken sentences.",
                               max_length=8000)
    greeting: str | None = None
    """Spoken when a session starts on a device's wake word; None: "Hi, I'm <name>. How can I help?"."""
    safe_reply: str | None = None
    """Said instead of a reply that moderation blocked; None: a short refusal in the persona's language."""
    voices: dict[str, str] = {}
    """TTS provider name → voice id for that provider, e.g. `{dashscope: longxiaochun_v2}`."""
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=16, le=8192)
    tools: list[str] | None = None
    """Tool names this persona may use, shell-style patterns allowed
    (`device__*` for a xiaozhi device's own tools, `files__*` for an MCP
    server's); None = every tool; [] = none."""
    memory: Literal["off", "explicit", "auto"] = "explicit"
    """Long-term memory: `off`; `explicit` = only what the user asks to be
    remembered; `auto` = also facts the user states about themselves."""
    knowledge: bool = True
    """Whether retrieved knowledge is put into its prompt."""

    def greeting_text(self) -> str:
        if self.greeting:
            return self.greeting
        if self.language.startswith("zh"):
            return f"你好，我是{self.name}，有什么可以帮你？"
        return f"Hi, I'm {self.name}. How can I help?"

    def safe_reply_text(self) -> str:
        if self.safe_reply:
            return self.safe_reply
        if self.language.startswith("zh"):
            return "这个问题我不方便回答，我们换个话题吧。"
        return "I'd rather not talk about that. Let's talk about something else."

    def allows_tool(self, name: str) -> bool:
        return self.tools is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.tools)

    def summary(self) -> dict[str, Any]:
        """What `GET /api/roles` shows: enough to choose, nothing internal."""
        return {"id": self.id, "name": self.name, "language": self.language, "description": self.description,
                "greeting": self.greeting_text(), "tools": self.tools, "memory": self.memory}


class PersonaError(ValueError):
    """A persona file is invalid; the message names the file and the field."""


def load_persona_dir(directory: Path) -> dict[str, Persona]:
    """Every `*.yaml` in the directory, by id (the file name). A bad file
    fails the start, named: a typo must not silently fall back to another persona."""
    personas: dict[str, Persona] = {}
    if not directory.is_dir():
        return personas
    for path in sorted(directory.glob("*.yaml")):
        pid = path.stem
        if not PERSONA_ID.match(pid):
            raise PersonaError(f"{path}: a persona's file name is its id: lower-case letters, digits, - and _")
        if path.stat().st_size > MAX_PERSONA_FILE_BYTES:
            raise PersonaError(f"{path}: larger than {MAX_PERSONA_FILE_BYTES} bytes")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise PersonaError(f"{path}: expected a mapping of persona fields")
            if raw.setdefault("id", pid) != pid:
                raise PersonaError(f"{path}: id {raw['id']!r} differs from the file name")
            personas[pid] = Persona.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PersonaError(f"{path}: {where}: {first['msg']}") from None
        except yaml.YAMLError as e:
            raise PersonaError(f"{path}: not valid YAML ({e})") from None
    return personas


def persona_config(config: Any, persona: Persona) -> Any:
    """The app config as this persona's session sees it: its voice in each TTS
    vendor section that has a `voice`, its temperature and reply length in
    the LLM vendor section. Sections without those fields are left alone."""
    from actors.providers import registry

    updates: dict[str, Any] = {}
    for stage, fields in (("tts", {"voice": None}),
                          ("llm", {"temperature": persona.temperature, "max_tokens": persona.max_tokens})):
        stage_cfg = getattr(config, stage)
        extra = dict(getattr(stage_cfg, "model_extra", None) or {})
        changed = False
        for name in registry.chain(config, stage):
            try:
                settings = registry.section(config, stage, name)
            except ValueError:
                continue
            if settings is None:
                continue
            section_name = registry.spec(stage, name).section
            values = dict(fields)
            if stage == "tts":
                values = {"voice": persona.voices.get(name)}
            patch = {k: v for k, v in values.items() if v is not None and k in type(settings).model_fields}
            if patch:
                extra[section_name] = {**settings.model_dump(exclude_unset=False, mode="python"), **patch}
                changed = True
        if changed:
            updates[stage] = stage_cfg.model_copy(update={}, deep=True)
            updates[stage].__pydantic_extra__ = extra
    # the session's persona is its config's default: whatever asks `config.persona()`
    # (the local dialogue engine's name, the greeting) gets this one
    return config.model_copy(update={**updates, "default_persona": persona.id})
