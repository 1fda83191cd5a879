"""The request in the OpenAI chat format: the project's history, tools and
settings as `chat.completions.create` arguments."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from actors.providers.base import ChatMessage, ToolSpec

if TYPE_CHECKING:
    from actors.providers.openai_compat.llm import OpenAICompatConfig


def build_request(cfg: OpenAICompatConfig, messages: list[ChatMessage], tools: list[ToolSpec],
                  system_prompt: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `chat.completions.create`."""
    request: dict[str, Any] = {
        "model": cfg.model,
        "messages": to_openai_messages(messages, system_prompt),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        request["tools"] = [to_openai_tool(t) for t in tools]
    if cfg.temperature is not None:
        request["temperature"] = cfg.temperature
    if cfg.max_tokens is not None:
        # max_tokens, not max_completion_tokens: the compatible servers
        # (DashScope, vLLM, Ollama) read this one.
        request["max_tokens"] = cfg.max_tokens
    if cfg.extra_body:
        request["extra_body"] = dict(cfg.extra_body)
    return request


def to_openai_messages(messages: list[ChatMessage], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The project's history as chat messages; `system_prompt` goes first
    unless the history already carries a system message."""
    out: list[dict[str, Any]] = []
    if system_prompt and not any(m.role == "system" for m in messages):
        out.append({"role": "system", "content": system_prompt})
    out.extend(to_openai_message(m) for m in messages)
    return out


def to_openai_message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        # content "" rather than null: some compatible servers reject null.
        return {"role": "assistant", "content": m.content, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in m.tool_calls]}
    return {"role": m.role, "content": m.content}


def to_openai_tool(spec: ToolSpec) -> dict[str, Any]:
    parameters = spec.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": spec.name, "description": spec.description,
                                             "parameters": parameters}}
