"""The OpenAI-compatible LLM provider against a real loopback HTTP server.

Pure asyncio, no Ray: the provider is a plain object the dialogue iterates,
and every behaviour that matters (SSE deltas, fragmented tool calls, status
codes, stalls, hanging up on barge-in) is on the socket, which the fake in
tests/fakes/openai_server.py provides and records.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from actors.providers.adapters.retry import RetryLLM, RetryPolicy, with_retries
from actors.providers.base import ChatMessage, LLMChunk, ProviderError, ToolCall, ToolSpec
from actors.providers.openai_compat.llm import OpenAICompatConfig, OpenAICompatLLM
from actors.providers.openai_compat.messages import to_openai_messages
from tests.dialogue_stub import StubCore
from tests.fakes.openai_server import Chunk, FakeOpenAIServer, FakeToolCall, RecordedRequest, Script

KEY = "sk-test-SECRET-7f3a9c"
KEY_ENV = "VA_TEST_OPENAI_KEY"
WEATHER = ToolSpec("get_weather", "Weather in a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
HELLO = [ChatMessage(role="user", content="hello")]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAIServer:
    server.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    return server


@pytest.fixture
async def make_llm(fake: FakeOpenAIServer) -> AsyncIterator[Any]:
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        """The provider as a failover link gets it: behind the retries its section declares."""
        fields = {"base_url": fake.base_url, "model": "qwen-plus", "api_key_env": KEY_ENV,
                  "retry_backoff_s": 0.05, "retry_max_backoff_s": 0.5, **overrides}
        cfg = OpenAICompatConfig(**fields)
        made.append(with_retries("llm", OpenAICompatLLM(cfg), cfg))
        return made[-1]

    yield make
    for llm in made:
        await llm.aclose()


async def collect(llm: OpenAICompatLLM, messages: list[ChatMessage] = HELLO,
                  tools: list[ToolSpec] | None = None) -> list[LLMChunk]:
    return [c async for c in llm.stream(messages, tools or [])]


def texts(chunks: list[LLMChunk]) -> list[str]:
    return [c.text for c in chunks if c.text]


def calls(chunks: list[LLMChunk]) -> list[ToolCall]:
    return [c.tool_call for c in chunks if c.tool_call]


# ------------------------------------------------------------------- text


async def test_text_arrives_as_deltas_in_order_with_usage(fake: FakeOpenAIServer, make_llm: Any) -> None:
    deltas = ["Hel", "lo, ", "wor", "ld."]
    usage = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    fake.enqueue(Script.text(deltas, between_s=0.1, usage=usage))
    llm = make_llm()
    arrivals: list[float] = []
    chunks: list[LLMChunk] = []
    async for chunk in llm.stream(HELLO, []):
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert texts(chunks) == deltas
    # delivered as they were sent (3 gaps of 0.1 s), not buffered to the end
    assert arrivals[len(deltas) - 1] - arrivals[0] >= 0.25
    assert llm.last_usage == usage
    assert getattr(chunks[-1], "usage", None) == usage and not chunks[-1].text
    assert calls(chunks) == []


async def test_request_carries_model_params_tools_and_key(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.text("ok"))
    llm = make_llm(model="qwen-turbo", temperature=0.3, max_tokens=64, extra_body={"enable_thinking": False})
    history = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="call_1", name="get_weather",
                                                                       arguments={"city": "Paris"})]),
        ChatMessage(role="tool", content='{"temp_c": 21}', tool_call_id="call_1"),
        ChatMessage(role="assistant", content="It is 21 degrees.", interrupted=True),
        ChatMessage(role="user", content="Thanks"),
    ]
    await collect(llm, history, [WEATHER])
    (req,) = fake.requests
    assert req.path == "/v1/chat/completions"
    assert req.authorization == f"Bearer {KEY}"
    body = req.body
    assert body["model"] == "qwen-turbo" and body["temperature"] == 0.3 and body["max_tokens"] == 64
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["enable_thinking"] is False  # extra_body is merged into the body
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER.parameters}}]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]


async def test_no_tools_means_no_tools_field(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.text("ok"))
    await collect(make_llm(temperature=None, max_tokens=None))
    body = fake.requests[0].body
    assert "tools" not in body and "temperature" not in body and "max_tokens" not in body


def test_system_prompt_goes_first_unless_history_has_one() -> None:
    assert to_openai_messages(HELLO, "You are Ava.") == [
        {"role": "system", "content": "You are Ava."}, {"role": "user", "content": "hello"}]
    with_system = [ChatMessage(role="system", content="Persona."), *HELLO]
    assert to_openai_messages(with_system, "You are Ava.")[0] == {"role": "system", "content": "Persona."}


# ------------------------------------------------------------- tool calls


async def test_parallel_tool_calls_assembled_from_interleaved_fragments(fake: FakeOpenAIServer,
                                                                        make_llm: Any) -> None:
    fake.enqueue(Script.tool_calls([
        FakeToolCall("call_a", "get_weather", '{"city": "Paris", "unit": "c"}'),
        FakeToolCall("call_b", "get_time", '{"zone": "Europe/Paris"}'),
    ], fragment=3, interleave=True, text_before="Let me check."))
    llm = make_llm()
    chunks = await collect(llm, tools=[WEATHER])
    assert texts(chunks) == ["Let me check."]
    assert calls(chunks) == [
        ToolCall(id="call_a", name="get_weather", arguments={"city": "Paris", "unit": "c"}),
        ToolCall(id="call_b", name="get_time", arguments={"zone": "Europe/Paris"}),
    ]
    assert llm.last_usage is not None and llm.last_usage["total_tokens"] > 0


async def test_tool_arguments_that_are_not_an_object_are_passed_raw(fake: FakeOpenAIServer,
                                                                   make_llm: Any) -> None:
    fake.enqueue(Script.tool_calls([("c1", "get_weather", '{"city": "Pa'), ("c2", "get_time", ""),
                                    ("c3", "calc", "[1, 2]")]))
    got = calls(await collect(make_llm(), tools=[WEATHER]))
    assert [c.arguments for c in got] == [{"_raw": '{"city": "Pa'}, {}, {"_raw": "[1, 2]"}]


async def test_tool_calls_ended_with_stop_are_still_yielded(fake: FakeOpenAIServer, make_llm: Any) -> None:
    """Some servers (older Ollama, llama.cpp) end a tool-call reply with "stop"."""
    script = Script.tool_calls([("c1", "get_weather", '{"city": "Oslo"}')])
    for chunk in script.chunks:
        if chunk.finish_reason == "tool_calls":
            chunk.finish_reason = "stop"
    fake.enqueue(script)
    assert calls(await collect(make_llm())) == [ToolCall(id="c1", name="get_weather", arguments={"city": "Oslo"})]


# ----------------------------------------------------------------- errors


async def test_401_is_llm_auth_naming_the_variable_never_the_key(
        fake: FakeOpenAIServer, make_llm: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    # worst case: the vendor's 401 body quotes the key it was sent
    fake.enqueue(Script.error(401, f"Incorrect API key provided: {KEY}."))
    llm = make_llm(api_key_env="DASHSCOPE_API_KEY")
    with pytest.raises(ProviderError) as info:
        await collect(llm)
    err = info.value
    assert err.code == "llm.auth"
    assert "$DASHSCOPE_API_KEY" in err.message
    rendered = "".join(traceback.format_exception(err))
    assert KEY not in rendered and KEY not in str(err) and KEY not in repr(err)
    assert KEY not in caplog.text
    assert len(fake.requests) == 1  # never retried


async def test_missing_key_is_llm_auth_before_any_request(fake: FakeOpenAIServer, make_llm: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VA_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ProviderError) as info:
        await collect(make_llm(api_key_env="VA_TEST_UNSET_KEY"))
    assert info.value.code == "llm.auth" and "$VA_TEST_UNSET_KEY" in info.value.message
    assert fake.requests == []


async def test_500_then_success_is_retried(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.error(500), Script.text(["fine", " now"]))
    assert texts(await collect(make_llm())) == ["fine", " now"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize(("status", "code"), [(429, "llm.rate_limited"), (503, "llm.unavailable")])
async def test_error_storm_fails_after_retries_with_backoff(fake: FakeOpenAIServer, make_llm: Any,
                                                            status: int, code: str) -> None:
    fake.enqueue(*[Script.error(status) for _ in range(5)])
    llm = make_llm(retries=2, retry_backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await collect(llm)
    assert info.value.code == code and f"HTTP {status}" in info.value.message
    assert len(fake.requests) == 3  # one try and two retries
    gaps = [b.received_at - a.received_at for a, b in zip(fake.requests, fake.requests[1:])]
    # back-off 0.05 s then 0.1 s, jitter ×0.5–1
    assert gaps[0] >= 0.02 and gaps[1] >= 0.045
    assert time.monotonic() - started < 2.0


async def test_retry_after_from_the_server_is_honoured(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.error(429, headers={"retry-after-ms": "300"}), Script.text("ok"))
    assert texts(await collect(make_llm(retry_backoff_s=0.01))) == ["ok"]
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.28


async def test_client_errors_are_not_retried(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.error(404, "The model `nope` does not exist."))
    with pytest.raises(ProviderError) as info:
        await collect(make_llm(model="nope"))
    assert info.value.code == "llm.bad_request" and "does not exist" in info.value.message
    assert len(fake.requests) == 1


async def test_error_event_inside_the_stream(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(Script.stream_error("Input data may contain inappropriate content."))
    with pytest.raises(ProviderError) as info:
        await collect(make_llm())
    assert info.value.code == "llm.stream_error" and "inappropriate" in info.value.message
    assert len(fake.requests) == 1


async def test_unreachable_server_is_llm_unreachable(make_llm: Any) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ProviderError) as info:
        await collect(make_llm(base_url=f"http://127.0.0.1:{port}/v1", retries=1))
    assert info.value.code == "llm.unreachable" and f"127.0.0.1:{port}" in info.value.message


# ------------------------------------------------------------------ stalls


@pytest.mark.parametrize("headers_first", [True, False], ids=["after-headers", "before-headers"])
async def test_stall_before_the_first_token_times_out(fake: FakeOpenAIServer, make_llm: Any,
                                                      headers_first: bool) -> None:
    fake.enqueue(Script.stall(5.0, headers_first=headers_first))
    llm = make_llm(first_token_timeout_s=0.4, timeout_s=10, retries=2)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await collect(llm)
    elapsed = time.monotonic() - started
    assert info.value.code == "llm.timeout" and "0.4 s" in info.value.message
    assert 0.35 <= elapsed < 1.5  # timeouts are not retried: the listener is already waiting
    assert len(fake.requests) == 1
    assert await fake.wait_until(lambda: fake.requests[0].disconnected, 3.0)


@pytest.mark.parametrize(("script", "code"), [
    (Script.stall(5.0, before=["Hel", "lo"]), "llm.timeout"),
    (Script(chunks=[Chunk(delta={"content": "Hel"}), Chunk(delta={"content": "lo"})], end="abort"),
     "llm.unreachable"),
], ids=["stall", "dropped"])
async def test_no_retry_once_text_reached_the_caller(fake: FakeOpenAIServer, make_llm: Any,
                                                      script: Script, code: str) -> None:
    fake.enqueue(script, Script.text("a different reply"))
    llm = make_llm(timeout_s=0.6, first_token_timeout_s=0.5, retries=2)
    got: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for chunk in llm.stream(HELLO, []):
            got.append(chunk.text)
    assert info.value.code == code
    assert "".join(got) == "Hello"
    assert len(fake.requests) == 1


async def test_losing_only_the_trailer_after_the_reply_is_not_an_error(fake: FakeOpenAIServer,
                                                                         make_llm: Any) -> None:
    fake.enqueue(Script(chunks=[Chunk(delta={"content": "Done."}), Chunk(delta={}, finish_reason="stop")],
                        end="abort"))
    llm = make_llm()
    assert texts(await collect(llm)) == ["Done."]
    assert llm.last_usage is None and len(fake.requests) == 1


# ------------------------------------------------------------ interruption


def _long_reply() -> Script:
    return Script.text([f"word{i} " for i in range(200)], between_s=0.02)


async def test_closing_the_iterator_closes_the_connection(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(_long_reply())
    stream = make_llm().stream(HELLO, [])
    assert (await anext(stream)).text == "word0 "
    assert (await anext(stream)).text == "word1 "
    await stream.aclose()
    req = fake.requests[0]
    assert await fake.wait_until(lambda: req.disconnected, 2.0)
    assert not req.completed


async def test_cancelling_the_consumer_closes_the_connection(fake: FakeOpenAIServer, make_llm: Any) -> None:
    fake.enqueue(_long_reply())
    llm = make_llm()
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in llm.stream(HELLO, []):
            if chunk.text:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 3.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    req = fake.requests[0]
    assert await fake.wait_until(lambda: req.disconnected, 2.0)
    assert not req.completed


# ----------------------------------------------------------------- config


def test_from_app_config_is_tolerant() -> None:
    from actors.config import load_config

    app = load_config(env={})
    assert OpenAICompatLLM.from_app_config(app).cfg == OpenAICompatConfig()  # section not there yet
    assert OpenAICompatLLM(app).cfg == OpenAICompatConfig()  # the `module:Class` plug-in form
    ns = SimpleNamespace(llm=SimpleNamespace(openai_compat={"model": "qwen-max", "extra_body": {"x": 1}}))
    cfg = OpenAICompatLLM.from_app_config(ns).cfg
    assert cfg.model == "qwen-max" and cfg.extra_body == {"x": 1} and cfg.api_key_env == "DASHSCOPE_API_KEY"
    assert OpenAICompatLLM.label == "openai-compatible"


def test_built_from_configuration_by_name() -> None:
    """`llm.provider: openai-compatible` with its `llm.openai_compat` section
    (validated when the configuration loads, typos named)."""
    from actors.config import ConfigError, load_config
    from actors.providers import build_llm

    env = {"VOICE_ACTORS__LLM__PROVIDER": "openai-compatible",
           "VOICE_ACTORS__LLM__OPENAI_COMPAT__MODEL": "qwen-max",
           "VOICE_ACTORS__LLM__OPENAI_COMPAT__EXTRA_BODY": "{enable_thinking: false}"}
    app = load_config(env=env)
    llm = build_llm(app.llm.provider, app)
    assert isinstance(llm, OpenAICompatLLM)
    assert llm.cfg.model == "qwen-max" and llm.cfg.extra_body == {"enable_thinking": False}
    with pytest.raises(ConfigError, match=r"llm\.openai_compat\.modle"):
        load_config(env={**env, "VOICE_ACTORS__LLM__OPENAI_COMPAT__MODLE": "x"})


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    cfg = OpenAICompatConfig(retry_backoff_s=0.1, retry_max_backoff_s=0.3)
    policy = RetryPolicy.of(cfg)
    assert policy is not None and RetryPolicy.of(OpenAICompatConfig(retries=0)) is None
    backoff_s = policy.delay_s
    for _ in range(50):
        assert 0.05 <= backoff_s(0) <= 0.1
        assert 0.1 <= backoff_s(1) <= 0.2
        assert backoff_s(5) <= 0.3
        assert backoff_s(0, retry_after_s=10) == 0.3


# ------------------------------------------------ the dialogue's tool loop


def _calculator_model(request: RecordedRequest) -> Script:
    """A model that asks the calculator, then reads the result out."""
    last = request.messages[-1]
    if last["role"] == "tool":
        return Script.text(f"That makes {last['content']}.")
    return Script.tool_calls([("call_calc", "calculate", '{"expression": "12 * 7"}')], fragment=5)


async def test_dialogue_runs_the_tool_loop_through_this_provider(fake: FakeOpenAIServer, make_llm: Any) -> None:
    from actors.agent.builtin_tools import default_registry
    from actors.agent.tools import ToolContext
    from actors.config import Persona
    from actors.dialogue import DialogueState, UserTurn
    from actors.events import LLMDelta, ToolCallEvent, ToolResultEvent

    fake.respond_with(_calculator_model)
    core = StubCore()
    dialogue = DialogueState(core, make_llm(), default_registry(), ToolContext(),  # type: ignore[arg-type]
                             Persona(), max_history=40)
    await dialogue.handle(UserTurn(turn_id=1, text="What is twelve times seven?"))
    assert core.errors == []
    assert core._timer.llm_usage and core._timer.llm_usage["total_tokens"] > 0  # both rounds' usage, summed
    (call,) = [e for e in core.events if isinstance(e, ToolCallEvent)]
    assert call.name == "calculate" and call.arguments == {"expression": "12 * 7"}
    (result,) = [e for e in core.events if isinstance(e, ToolResultEvent)]
    assert "84" in result.result
    assert "84" in "".join(e.text for e in core.events if isinstance(e, LLMDelta))
    first, second = fake.requests
    assert first.messages[0] == {"role": "system", "content": Persona().system_prompt}
    assert {t["function"]["name"] for t in first.tools or []} >= {"calculate", "get_time"}
    assert second.messages[-2]["tool_calls"][0]["id"] == "call_calc"
    assert second.messages[-1] == {"role": "tool", "tool_call_id": "call_calc", "content": result.result}
    assert dialogue.history[-1].role == "assistant" and "84" in dialogue.history[-1].content


# --------------------------------------------------------- the fake itself


async def test_fake_runs_in_the_current_loop_and_answers_non_streaming() -> None:
    import openai

    async with FakeOpenAIServer(default=Script.tool_calls([("c1", "f", '{"a": 1}')], text_before="hi")) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        try:
            reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        finally:
            await client.close()
    message = reply.choices[0].message
    assert message.content == "hi" and message.tool_calls[0].function.arguments == '{"a": 1}'
    assert reply.choices[0].finish_reason == "tool_calls" and not fake.requests[0].body.get("stream")


def test_each_failover_link_gets_the_retries_its_section_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors.config import AppConfig
    from actors.providers.stages import chained_llm

    monkeypatch.setenv(KEY_ENV, KEY)
    config = AppConfig.model_validate({"llm": {
        "provider": "openai-compatible", "fallback": ["local-dialogue"],
        "openai_compat": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV, "retries": 3}}})
    chain = chained_llm(config).chain
    first = chain.links[0].provider
    assert isinstance(first, RetryLLM) and first.policy.retries == 3
    assert first.cfg.retries == 3, "the provider's own attributes read through the wrapper"
    assert not isinstance(chain.links[1].provider, RetryLLM), "the local engine declares no retries"
    no_retries = OpenAICompatLLM(OpenAICompatConfig(retries=0, api_key_env=KEY_ENV))
    assert with_retries("llm", no_retries, no_retries.cfg) is no_retries
