"""Which provider names exist, where each is built, and whether it holds a
model.

Vendors own their names and their configuration: each vendor package
(`actors.providers.local`, `.dashscope`, `.openai_compat`) declares
`PROVIDERS`, a map of (kind, name) to a `ProviderSpec`, and importing the
package costs nothing (specs name their factory by import path, loaded only
when that provider is built). A vendor's settings live in a section of its
own under the stage (`stt.dashscope`, `llm.openai_compat`), validated by the
vendor's model when the configuration loads. Any `package.module:Class`
works too: a plug-in built as `Class(config)` (the bench's fixed-delay fakes).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["vad", "stt", "llm", "tts"]
VENDOR_PACKAGES = ("actors.providers.local", "actors.providers.dashscope", "actors.providers.openai_compat")


@dataclass(frozen=True)
class ProviderSpec:
    factory: str
    """`module:callable`, called with the AppConfig."""
    pooled: bool = False
    """True for a local model: loaded once in a pool actor and shared. A cloud
    client is opened by the session itself, so audio takes no extra hop."""
    section: str | None = None
    """The vendor's settings under the stage, e.g. `dashscope` for `stt.dashscope`."""
    config_model: str | None = None
    """`module:Model` validating that section."""


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def specs() -> dict[tuple[str, str], ProviderSpec]:
    found: dict[tuple[str, str], ProviderSpec] = {}
    for package in VENDOR_PACKAGES:
        found.update(getattr(importlib.import_module(package), "PROVIDERS", {}))
    return found


def is_plugin(name: str) -> bool:
    return ":" in name


def spec(kind: Kind, name: str) -> ProviderSpec:
    if is_plugin(name):
        # a plug-in may load a model, so it is pooled unless its class says
        # `pooled = False` (a client of a remote service, opened by its caller)
        return ProviderSpec(factory=name, pooled=bool(getattr(_load(name), "pooled", True)))
    try:
        return specs()[(kind, name)]
    except KeyError:
        raise ValueError(f"unknown {kind} provider {name!r}; known: {', '.join(known(kind))}, "
                         "or an import path 'package.module:Class'") from None


def known(kind: Kind) -> list[str]:
    return sorted(name for k, name in specs() if k == kind)


def build(kind: Kind, name: str, config: Any) -> Any:
    return _load(spec(kind, name).factory)(config)


def section(config: Any, kind: Kind, name: str) -> Any:
    """The vendor's validated settings for `name` (its own model's defaults
    when the section is absent)."""
    s = spec(kind, name)
    if s.section is None or s.config_model is None:
        return None
    raw = (getattr(getattr(config, kind), "model_extra", None) or {}).get(s.section) or {}
    return _load(s.config_model).model_validate(raw)


def check(config: Any) -> list[str]:
    """Every configured provider exists and its section is valid: problems as
    `stage.field: message` lines, so a bad config fails at start, named."""
    from pydantic import ValidationError

    problems: list[str] = []
    chosen: list[tuple[Kind, str, str]] = [("vad", config.vad.provider, "vad.provider"),
                                           ("stt", config.stt.provider, "stt.provider"),
                                           ("llm", config.llm.provider, "llm.provider"),
                                           ("tts", config.tts.provider, "tts.provider")]
    for kind in ("stt", "llm", "tts"):
        for i, name in enumerate(getattr(config, kind).fallback):
            chosen.append((kind, name, f"{kind}.fallback[{i}]"))
    for kind in ("stt", "llm", "tts"):
        sections = {s.section for (k, _), s in specs().items() if k == kind and s.section}
        for extra in getattr(getattr(config, kind), "model_extra", None) or {}:
            if extra not in sections:
                problems.append(f"{kind}.{extra}: not a field of {kind} nor a vendor section "
                                f"({', '.join(sorted(sections)) or 'none'})")
    for kind, name, where in chosen:
        if is_plugin(name):
            continue
        try:
            s = spec(kind, name)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if s.section is not None:
            try:
                section(config, kind, name)
            except ValidationError as e:
                for err in e.errors():
                    loc = ".".join(str(p) for p in err["loc"])
                    problems.append(f"{kind}.{s.section}.{loc}: {err['msg']} (got {err.get('input')!r})")
    return problems


def key_problem(config: Any, kind: Kind, name: str, env: Any = None) -> str | None:
    """Why this cloud provider cannot run (its key is neither in the config
    nor in its environment variable), naming the variable, never a value;
    None when it can."""
    import os

    env = os.environ if env is None else env
    if is_plugin(name):
        return None
    settings = section(config, kind, name)
    variable = getattr(settings, "api_key_env", None)
    if settings is None or getattr(settings, "api_key", None) is not None or not variable:
        return None
    if env.get(variable):
        return None
    where = spec(kind, name).section
    return (f"{kind} provider {name!r} needs an API key: set ${variable} "
            f"(or {kind}.{where}.api_key in a config file outside git)")


def chain(config: Any, kind: Kind) -> list[str]:
    """The stage's provider followed by its fallbacks, without repeats."""
    stage = getattr(config, kind)
    return list(dict.fromkeys([stage.provider, *stage.fallback]))


def usable_chain(config: Any, kind: Kind, env: Any = None) -> list[str]:
    """The chain without the links that lack their key; the whole chain when
    none has one (so the call fails with the key's own clear error)."""
    names = chain(config, kind)
    usable = [n for n in names if key_problem(config, kind, n, env) is None]
    return usable or names


def missing_keys(config: Any, env: Any = None) -> list[str]:
    """Stages that cannot run at all because no provider of their chain has
    its key: said at start instead of failing at the first call of the first
    session. A primary without its key whose chain falls back to a provider
    that needs none is not a problem (see `skipped_for_keys`)."""
    problems = []
    for kind in ("stt", "llm", "tts"):
        reasons = [key_problem(config, kind, n, env) for n in chain(config, kind)]
        if all(reasons):
            problems.append(str(reasons[0]))
    return problems


def skipped_for_keys(config: Any, env: Any = None) -> list[str]:
    """Providers left out of their chain for want of a key, while a later
    link can serve: logged at start so the operator knows."""
    skipped = []
    for kind in ("stt", "llm", "tts"):
        reasons = [key_problem(config, kind, n, env) for n in chain(config, kind)]
        if not all(reasons):
            skipped.extend(f"{r}; using the next provider of {kind}.fallback" for r in reasons if r)
    return skipped
