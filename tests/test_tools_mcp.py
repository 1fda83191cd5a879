"""Issue 10 item 5: tools, the MCP client and xiaozhi device tools.

Registry tools in a configured zone, reminders spoken by the session,
end_conversation really ending it; per-call timeouts, errors returned to the
LLM, the depth limit and cancellation in the dialogue's tool loop; a stdio
MCP server (tests/fakes/mcp_server.py) through the registry and through the
LLM loop, and the same server over streamable HTTP; and a fake xiaozhi device over the real Serve proxy whose tools are
listed (two pages), called by the LLM, and whose socket closes normally when
the conversation ends."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from actors.agent.builtin_tools import default_registry, reminder_delay, spec
from actors.agent.device_tools import DeviceTools
from actors.agent.mcp import LocalSource, MCPManager, clean_schema, llm_name, result_text
from actors.agent.persona import Persona
from actors.agent.tools import MCPServerConfig, SessionTools, ToolContext, ToolError, ToolRegistry, ToolsConfig, clock
from actors.providers.base import LLM, TTS, AudioSegment, ChatMessage, LLMChunk, ToolCall, ToolSpec
from tests.conftest import INGRESS_PORT, run_ingress
from tests.dialogue_stub import StubCore
from tests.fakes.openai_server import FakeOpenAIServer, RecordedRequest, Script

ROOT = Path(__file__).resolve().parent.parent
FAKE_MCP = MCPServerConfig(name="fake", command=sys.executable, args=["-m", "tests.fakes.mcp_server"],
                           cwd=str(ROOT), timeout_s=30)


def run(tools: ToolRegistry, ctx: ToolContext, name: str, **arguments: Any) -> Any:
    async def go() -> str:
        return await tools.run(ToolCall(id="t", name=name, arguments=arguments), ctx)
    return json.loads(asyncio.run(go()))


# ------------------------------------------------------------- registry tools
def test_time_and_date_in_the_configured_zone() -> None:
    cfg = ToolsConfig(timezone="Asia/Tokyo")
    out = run(default_registry(), ToolContext(now=clock(cfg.timezone)), "get_time")
    assert out["zone"] == "Asia/Tokyo" and out["iso"].endswith("+09:00")
    assert datetime.fromisoformat(out["iso"]).utcoffset().total_seconds() == 9 * 3600
    with pytest.raises(ValidationError):
        ToolsConfig(timezone="Mars/Olympus_Mons")
    with pytest.raises(ValidationError):
        ToolsConfig(mcp_servers=[{"name": "x", "transport": "http", "url": "file:///etc/passwd"}])
    with pytest.raises(ValidationError):
        ToolsConfig(surprise=True)


def test_hook_tools_are_offered_only_with_their_hooks() -> None:
    reg = default_registry()
    bare = {s.name for s in reg.specs(ToolContext())}
    assert {"get_time", "calculate", "set_timer"} <= bare
    assert not bare & {"set_reminder", "end_conversation", "search_knowledge", "save_memory", "recall_memory"}
    assert "unknown tool" in run(reg, ToolContext(), "save_memory", fact="x")["error"]

    saved: list[str] = []

    async def recall(query: str, limit: int) -> list[str]:
        return [f for f in saved if query.split()[0] in f][:limit]

    ctx = ToolContext(knowledge_search=lambda q, n: [{"title": "Hours", "text": f"open 9-5 ({q})"}],
                      memory_save=saved.append, memory_recall=recall, say=print, end_conversation=lambda: None)
    full = {s.name for s in reg.specs(ctx)}
    assert {"set_reminder", "end_conversation", "search_knowledge", "save_memory", "recall_memory"} <= full
    assert run(reg, ctx, "search_knowledge", query="opening hours")["results"][0]["text"] == "open 9-5 (opening hours)"
    assert run(reg, ctx, "save_memory", fact="peanut allergy") == {"saved": True, "fact": "peanut allergy"}
    assert run(reg, ctx, "recall_memory", query="peanut")["memories"] == ["peanut allergy"]
    assert "too long" in run(reg, ctx, "save_memory", fact="x" * 600)["error"]


def test_reminder_times_are_parsed_in_the_session_zone() -> None:
    zone = ZoneInfo("Europe/Paris")
    now = datetime(2025, 5, 1, 18, 0, tzinfo=zone)
    assert reminder_delay(now, "18:30", None)[0] == 1800
    assert reminder_delay(now, "07:00", None)[1].day == 2  # already past today: tomorrow
    assert reminder_delay(now, None, 90)[0] == 90
    assert reminder_delay(now, "2025-05-02T18:00", None)[0] == 86400
    for at, seconds in (("25:00", None), ("soon", None), (None, None), ("18:30", 5.0), (None, 10 ** 9)):
        with pytest.raises(ToolError):
            reminder_delay(now, at, seconds)


async def test_a_reminder_fires_as_a_spoken_message() -> None:
    said: list[str] = []
    ctx = ToolContext(say=said.append)
    out = json.loads(await default_registry().run(
        ToolCall(id="r", name="set_reminder", arguments={"message": "take the cake out", "in_seconds": 1}), ctx))
    assert out["scheduled"] is True and ctx.reminders.pending == 1
    await asyncio.sleep(1.3)
    assert said == ["Reminder: take the cake out"]
    for _ in range(20):
        ctx.reminders.schedule(60, "x", said.append)
    with pytest.raises(ToolError):  # bounded
        ctx.reminders.schedule(60, "x", said.append)
    ctx.reminders.cancel_all()


async def test_per_call_timeout_and_tool_errors_become_results() -> None:
    reg = ToolRegistry()

    async def slow(args: dict, ctx: ToolContext) -> dict:
        await asyncio.sleep(5)
        return {}

    def broken(args: dict, ctx: ToolContext) -> dict:
        raise KeyError("bug")

    reg.register(spec("slow", "Sleeps.", {}, []), slow)
    reg.register(spec("broken", "Breaks.", {}, []), broken)
    reg.register(spec("big", "Too much.", {}, []), lambda a, c: {"x": "y" * 20000})
    tools = SessionTools(reg, ToolContext(), ToolsConfig(call_timeout_s=0.2))
    started = asyncio.get_running_loop().time()
    out = json.loads(await tools.run(ToolCall(id="1", name="slow")))
    assert "0.2 s" in out["error"] and asyncio.get_running_loop().time() - started < 1.0
    assert json.loads(await tools.run(ToolCall(id="2", name="broken"))) == {"error": "the tool failed (KeyError)"}
    assert "too large" in json.loads(await tools.run(ToolCall(id="3", name="big")))["error"]
    with pytest.raises(ValueError):
        reg.register(spec("no spaces allowed", "x", {}, []), slow)


# ------------------------------------------------------------ the tool loop
def _dialogue(llm: LLM, tools: ToolRegistry, ctx: ToolContext) -> Any:
    from actors.dialogue import DialogueState

    return DialogueState(StubCore("tools-test"), llm, tools, ctx, Persona(), max_history=40)  # type: ignore[arg-type]


class ScriptLLM(LLM):
    """Answers each request with `reply(messages, tools)`: text or a tool call."""

    def __init__(self, reply: Callable[[list[ChatMessage], list[ToolSpec]], str | ToolCall]) -> None:
        self.reply = reply
        self.requests: list[tuple[list[ChatMessage], list[ToolSpec]]] = []

    async def stream(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> AsyncIterator[LLMChunk]:
        self.requests.append((list(messages), list(tools)))
        out = self.reply(messages, tools)
        if isinstance(out, ToolCall):
            yield LLMChunk(tool_call=out)
        else:
            yield LLMChunk(text=out)


async def test_depth_limit_then_an_answer_without_tools() -> None:
    llm = ScriptLLM(lambda m, t: ToolCall(id=f"c{len(m)}", name="get_time") if t else "I give up on tools.")
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig(max_rounds=2))
    dialogue = _dialogue(llm, tools, tools.ctx)
    from actors.dialogue import UserTurn

    await dialogue.handle(UserTurn(turn_id=1, text="time?"))
    assert len(llm.requests) == 3 and [bool(t) for _, t in llm.requests] == [True, True, False]
    assert dialogue.history[-1].content == "I give up on tools."
    assert sum(1 for m in dialogue.history if m.role == "tool") == 2


async def test_an_interrupted_turn_cancels_its_tool_calls() -> None:
    from actors.dialogue import UserTurn

    cancelled = asyncio.Event()

    async def hang(args: dict, ctx: ToolContext) -> dict:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    reg = default_registry()
    reg.register(spec("hang", "Hangs.", {}, []), hang)
    llm = ScriptLLM(lambda m, t: ToolCall(id="h1", name="hang") if m[-1].role == "user" else "done")
    tools = SessionTools(reg, ToolContext(), ToolsConfig(call_timeout_s=60))
    dialogue = _dialogue(llm, tools, tools.ctx)
    work = asyncio.get_running_loop().create_task(dialogue.handle(UserTurn(turn_id=1, text="hang")))
    await asyncio.sleep(0.2)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert cancelled.is_set()
    call, result = dialogue.history[-2], dialogue.history[-1]
    assert call.tool_calls[0].id == "h1"
    assert result.role == "tool" and result.tool_call_id == "h1" and "cancelled" in result.content


# -------------------------------------------------------------------- MCP
def test_names_schemas_and_results_are_bounded() -> None:
    taken: set[str] = set()
    assert llm_name("device__", "self.audio_speaker.set_volume", taken) == "device__self_audio_speaker_set_volume"
    taken.add("device__a_b")
    assert llm_name("device__", "a.b", taken) == "device__a_b_2"
    assert len(llm_name("s__", "x" * 500, set()) or "") == 64
    assert llm_name("device__", "...", set()) is None
    assert clean_schema({"type": "object", "properties": {"a": {"type": "string"} for _ in [0]}}) == {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": []}
    assert clean_schema({"type": "object", "properties": {f"p{i}": {"description": "x" * 100} for i in range(99)}}) \
        == {"type": "object", "properties": {}}
    assert clean_schema("junk") == {"type": "object", "properties": {}}
    assert result_text({"content": [{"type": "text", "text": "a"}, {"type": "image"}]}) == "a\n[image content]"
    with pytest.raises(ToolError):
        result_text({"content": [{"type": "text", "text": "nope"}], "isError": True})


@pytest.fixture(scope="module")
def fake_mcp() -> Any:
    return LocalSource([FAKE_MCP])


async def test_stdio_mcp_tools_listed_and_called_through_the_registry(fake_mcp: LocalSource) -> None:
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig(call_timeout_s=5), remote=fake_mcp)
    await tools.prepare(wait_s=30)
    names = tools.names()
    assert {"fake__add", "fake__shout", "fake__fail", "fake__slow", "get_time"} <= set(names)
    assert await tools.run(ToolCall(id="1", name="fake__add", arguments={"a": 2, "b": 40})) == "42"
    assert await tools.run(ToolCall(id="2", name="fake__shout", arguments={"text": "hi"})) == "HI!"
    assert "error" in json.loads(await tools.run(ToolCall(id="3", name="fake__fail")))
    assert "must be a integer" in json.loads(await tools.run(
        ToolCall(id="4", name="fake__add", arguments={"a": "2", "b": 1})))["error"]
    slow = SessionTools(default_registry(), ToolContext(), ToolsConfig(call_timeout_s=0.3), remote=fake_mcp)
    await slow.prepare(wait_s=30)
    assert "0.3 s" in json.loads(await slow.run(ToolCall(id="5", name="fake__slow", arguments={"seconds": 5})))["error"]
    # a server that is allowed only some tools, under another name, in its own manager
    limited = MCPManager([FAKE_MCP.model_copy(update={"name": "calc", "allowed_tools": ["add"]})])
    try:
        assert [s.name for s in await limited.specs()] == ["calc__add"]
    finally:
        await limited.aclose()


async def test_the_shared_hub_serves_mcp_tools_over_ray(ray_cluster: Any) -> None:
    """In a Ray worker (a session) the servers live in one shared hub actor."""
    from actors.agent.mcp import HubSource, mcp_source
    from tests.conftest import TEST_NAMESPACE

    source = mcp_source(ToolsConfig(mcp_servers=[FAKE_MCP]), TEST_NAMESPACE)
    assert isinstance(source, HubSource)
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig(call_timeout_s=5), remote=source)
    await tools.prepare(wait_s=60)
    assert await tools.run(ToolCall(id="1", name="fake__add", arguments={"a": 1, "b": 2})) == "3"
    assert "error" in json.loads(await tools.run(ToolCall(id="2", name="fake__fail")))
    again = mcp_source(ToolsConfig(mcp_servers=[FAKE_MCP]), TEST_NAMESPACE)
    assert again is not None and [s.name for s in await again.specs()] == [s.name for s in await source.specs()]


def _mcp_model(request: RecordedRequest) -> Script:
    last = request.messages[-1]
    if last["role"] == "tool":
        return Script.text(f"The sum is {last['content']}.")
    return Script.tool_calls([("call_add", "fake__add", '{"a": 19, "b": 23}')], fragment=3)


async def test_stdio_mcp_tool_through_the_llm_loop(fake_mcp: LocalSource) -> None:
    from actors.dialogue import UserTurn
    from actors.events import ToolResultEvent
    from actors.providers.openai_compat.llm import OpenAICompatConfig, OpenAICompatLLM

    async with FakeOpenAIServer(api_key="sk-mcp-test") as fake:
        fake.respond_with(_mcp_model)
        llm = OpenAICompatLLM(OpenAICompatConfig(base_url=fake.base_url, model="qwen-plus", api_key="sk-mcp-test"))
        tools = SessionTools(default_registry(), ToolContext(), ToolsConfig(), remote=fake_mcp)
        dialogue = _dialogue(llm, tools, tools.ctx)
        try:
            await dialogue.handle(UserTurn(turn_id=1, text="What is 19 plus 23?"))
        finally:
            await llm.aclose()
        first, second = fake.requests
        assert "fake__add" in {t["function"]["name"] for t in first.tools or []}
        assert second.messages[-1] == {"role": "tool", "tool_call_id": "call_add", "content": "42"}
        assert dialogue.history[-1].content == "The sum is 42."
        assert [e.result for e in dialogue._core.events if isinstance(e, ToolResultEvent)] == ["42"]


# --------------------------------------------------------------- device tools
async def test_device_tools_listing_pagination_and_calls() -> None:
    sent: list[dict] = []
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig())
    device = DeviceTools(tools, sent.append, timeout_s=0.5, max_tools=3)
    device.on_message({"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": "2024-11-05",
                                                              "serverInfo": {"name": "esp-box", "version": "1.7"}}})
    assert device.server_info["name"] == "esp-box" and sent[-1]["method"] == "notifications/initialized"
    device.on_message({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
        {"name": "self.get_device_status", "description": "Status.", "inputSchema": {"type": "object"}},
        {"name": 7}, "junk"], "nextCursor": "page2"}})
    assert sent[-1]["method"] == "tools/list" and sent[-1]["params"] == {"cursor": "page2"}
    assert not device.names  # offered once the listing is complete
    device.on_message({"jsonrpc": "2.0", "id": sent[-1]["id"], "result": {"tools": [
        {"name": "self.audio_speaker.set_volume", "description": "Volume.",
         "inputSchema": {"type": "object", "properties": {"volume": {"type": "integer"}}, "required": ["volume"]}},
        {"name": "a"}, {"name": "b"}]}})
    assert device.names == ["device__self_get_device_status", "device__self_audio_speaker_set_volume", "device__a"]
    assert "device__self_audio_speaker_set_volume" in tools.names()

    async def answer(result: dict) -> None:
        while not sent or sent[-1].get("method") != "tools/call":
            await asyncio.sleep(0.01)
        device.on_message({"jsonrpc": "2.0", "id": sent[-1]["id"], **result})

    call = ToolCall(id="v", name="device__self_audio_speaker_set_volume", arguments={"volume": 30})
    task = asyncio.ensure_future(tools.run(call))
    await answer({"result": {"content": [{"type": "text", "text": "true"}], "isError": False}})
    assert await task == "true"
    assert sent[-1]["params"] == {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 30}}
    sent.clear()
    task = asyncio.ensure_future(tools.run(call))
    await answer({"error": {"code": -32601, "message": "Unknown tool"}})
    assert "Unknown tool" in json.loads(await task)["error"]
    sent.clear()
    assert "did not answer" in json.loads(await tools.run(call))["error"]  # 0.5 s device timeout
    task = asyncio.ensure_future(tools.run(call))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent[-1]["method"] == "notifications/cancelled"
    # a fresh listing (a reconnect) replaces the old tools
    device.on_message({"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "self.reboot"}]}})
    assert [n for n in tools.names() if n.startswith("device__")] == ["device__self_reboot"]


def test_the_local_engine_ends_the_conversation_when_it_may() -> None:
    from actors.agent.knowledge import KnowledgeBase
    from actors.providers.local.dialogue import LocalDialogueEngine

    engine = LocalDialogueEngine(KnowledgeBase([]))
    bye = [ChatMessage(role="user", content="Goodbye!")]
    allowed = default_registry().specs(ToolContext(end_conversation=lambda: None))
    assert engine.respond(bye, allowed).tool_call.name == "end_conversation"
    assert engine.respond(bye, default_registry().specs()).tool_call is None
    after = [*bye, ChatMessage(role="assistant", tool_calls=[ToolCall(id="b", name="end_conversation")]),
             ChatMessage(role="tool", content='{"ending": true}', tool_call_id="b")]
    assert "Goodbye" in engine.respond(after, allowed).text


# ------------------------------------------------ end_conversation in a session
class _SilentTTS(TTS):
    async def synthesize(self, text: str) -> AudioSegment:
        return AudioSegment(pcm16=b"\0\0" * 1600, sample_rate=16000)


async def test_end_conversation_ends_the_session_after_the_goodbye() -> None:
    from actors.config import load_config
    from actors.events import ErrorEvent, TTSSentence
    from actors.providers import build_vad
    from actors.session_core import SessionCore
    from actors.tts import OutputPrefs

    def model(messages: list[ChatMessage], tools: list[ToolSpec]) -> str | ToolCall:
        if messages[-1].role == "user":
            return ToolCall(id="bye", name="end_conversation")
        return "Goodbye!"

    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    core = SessionCore("sess-end", config, vad=build_vad(config), stt=_SilentTTS(),  # type: ignore[arg-type]
                       llm=ScriptLLM(model), tts=_SilentTTS())
    core.start()
    events = core.subscribe(OutputPrefs(pace=False))
    assert "end_conversation" in core.tools.names() and "set_reminder" in core.tools.names()
    core.send_text("that's all, bye")
    seen: list[Any] = []
    async with asyncio.timeout(10):
        while not (isinstance(ev := await events.get(), ErrorEvent) and ev.code == "session.closed"):
            seen.append(ev)
    assert any(isinstance(e, TTSSentence) and e.text == "Goodbye!" for e in seen)
    assert [e.type for e in seen][-1] in ("tts.stop", "metrics")
    assert core.closed


def _speaking_session(session_id: str) -> tuple[Any, asyncio.Queue[Any]]:
    """A started SessionCore on silent providers, and its event queue."""
    from actors.config import load_config
    from actors.providers import build_vad
    from actors.session_core import SessionCore
    from actors.tts import OutputPrefs

    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})
    core = SessionCore(session_id, config, vad=build_vad(config), stt=_SilentTTS(),  # type: ignore[arg-type]
                       llm=ScriptLLM(lambda m, t: "ok"), tts=_SilentTTS())
    core.start()
    return core, core.subscribe(OutputPrefs(pace=False))


async def test_a_reminder_is_spoken_by_the_session() -> None:
    from actors.events import TTSSentence

    core, events = _speaking_session("sess-remind")
    out = json.loads(await core.tools.run(ToolCall(id="r", name="set_reminder",
                                                   arguments={"message": "stretch", "in_seconds": 1})))
    assert out["scheduled"]
    async with asyncio.timeout(5):
        while not (isinstance(ev := await events.get(), TTSSentence) and ev.text == "Reminder: stretch"):
            pass
    await core.close()


async def test_a_timer_is_spoken_by_the_session_and_shares_the_reminders_cap() -> None:
    """Timers once bypassed the cap (30 of 30 one-hour timers were taken)."""
    from actors.agent.tools import MAX_PENDING_REMINDERS
    from actors.events import TTSSentence

    core, events = _speaking_session("sess-timer")

    async def set_timer(seconds: float, label: str) -> dict[str, Any]:
        return json.loads(await core.tools.run(ToolCall(id="t", name="set_timer",
                                                        arguments={"seconds": seconds, "label": label})))

    assert (await set_timer(1, "tea"))["scheduled"]
    async with asyncio.timeout(5):
        while not (isinstance(ev := await events.get(), TTSSentence) and ev.text == "Your tea timer is done."):
            pass
    for i in range(MAX_PENDING_REMINDERS):
        assert (await set_timer(3600, f"t{i}"))["scheduled"]
    refused = await set_timer(3600, "one too many")
    assert "at most" in refused["error"]
    assert core.tool_context.reminders.pending == MAX_PENDING_REMINDERS
    await core.close()
    assert core.tool_context.reminders.pending == 0


# ---------------------------------------------------- a xiaozhi device, end to end
BASE = f"http://127.0.0.1:{INGRESS_PORT}"
KEY = "sk-test-tools-0123456789"
DEVICE = "02:dd:00:00:00:01"


def _device_model(request: RecordedRequest) -> Script:
    last = request.messages[-1]
    if last["role"] == "tool":
        if last["tool_call_id"] == "call_bye":
            return Script.text("Goodbye!")
        return Script.text(f"Done, the device said {last['content']}.")
    if "end" in last["content"]:
        return Script.tool_calls([("call_bye", "end_conversation", "{}")])
    return Script.tool_calls([("call_vol", "device__self_audio_speaker_set_volume", '{"volume": 80}')])


@pytest.fixture(scope="module")
def llm_fake() -> Any:
    with FakeOpenAIServer(api_key=KEY) as fake:
        fake.respond_with(_device_model)
        yield fake


@pytest.fixture(scope="module")
def device_server(ray_cluster: Any, config: Any, llm_fake: FakeOpenAIServer) -> Any:
    from actors.config import LLMConfig

    llm_cfg = LLMConfig.model_validate({**config.llm.model_dump(), "provider": "openai-compatible",
                                        "openai_compat": {"base_url": llm_fake.base_url, "api_key": KEY,
                                                          "model": "qwen-plus"}})
    auth = config.auth.model_copy(update={"jwt_secret": SecretStr("tools-jwt-secret-0123456789abcdef"),
                                          "device_secret": SecretStr("tools-device-secret-0123456789ab"),
                                          "device_allowlist": [DEVICE], "device_admission": "allowlist"})
    # home-assistant: a persona that may use every tool, the device's included
    yield from run_ingress(config.model_copy(update={"llm": llm_cfg, "auth": auth,
                                                     "default_persona": "home-assistant"}), "voice-actors-tools")


async def _recv_json(ws: Any, want: Callable[[dict], bool], timeout: float = 20.0) -> dict:
    seen: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await ws.recv()
                if isinstance(data, str):
                    if want(msg := json.loads(data)):
                        return msg
                    seen.append(msg)
    except TimeoutError:
        raise AssertionError(f"not received; got {seen[-10:]}") from None


async def test_xiaozhi_device_tools_listed_called_and_the_socket_closed_at_the_end(
        device_server: Any, llm_fake: FakeOpenAIServer) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with httpx.AsyncClient() as http:
        r = await http.post(f"{BASE}/xiaozhi/ota/", headers={"Device-Id": DEVICE, "Client-Id": DEVICE}, json={})
    ws_info = r.json()["websocket"]
    headers = {"Protocol-Version": "1", "Device-Id": DEVICE, "Client-Id": DEVICE,
               "Authorization": f"Bearer {ws_info['token']}"}
    llm_fake.requests.clear()
    async with connect(ws_info["url"], additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "version": 1, "transport": "websocket", "features": {"mcp": True},
                                  "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                   "frame_duration": 60}}))
        hello = json.loads(await ws.recv())
        sid = hello["session_id"]

        def mcp(method: str) -> Callable[[dict], bool]:
            return lambda m: m.get("type") == "mcp" and m["payload"].get("method") == method

        async def reply(rid: int, result: dict) -> None:
            await ws.send(json.dumps({"session_id": sid, "type": "mcp",
                                      "payload": {"jsonrpc": "2.0", "id": rid, "result": result}}))

        init = await _recv_json(ws, mcp("initialize"))
        first = await _recv_json(ws, mcp("tools/list"))
        await reply(init["payload"]["id"], {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                                            "serverInfo": {"name": "fake-box", "version": "1.0"}})
        await reply(first["payload"]["id"], {"tools": [
            {"name": "self.get_device_status", "description": "Device status.",
             "inputSchema": {"type": "object", "properties": {}}}], "nextCursor": "p2"})
        second = await _recv_json(ws, mcp("tools/list"))
        assert second["payload"]["params"] == {"cursor": "p2"}
        await reply(second["payload"]["id"], {"tools": [
            {"name": "self.audio_speaker.set_volume", "description": "Set the speaker volume.",
             "inputSchema": {"type": "object", "properties": {"volume": {"type": "integer"}},
                             "required": ["volume"]}}]})
        await ws.send(json.dumps({"session_id": sid, "type": "listen", "state": "detect", "text": "louder please"}))
        call = await _recv_json(ws, mcp("tools/call"))
        assert call["payload"]["params"] == {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 80}}
        await reply(call["payload"]["id"], {"content": [{"type": "text", "text": "true"}], "isError": False})
        await _recv_json(ws, lambda m: m.get("type") == "tts" and m.get("state") == "stop", 60)
        offered = {t["function"]["name"] for t in llm_fake.requests[0].tools or []}
        assert {"device__self_get_device_status", "device__self_audio_speaker_set_volume",
                "end_conversation"} <= offered
        assert llm_fake.requests[1].messages[-1] == {"role": "tool", "tool_call_id": "call_vol", "content": "true"}

        await ws.send(json.dumps({"session_id": sid, "type": "listen", "state": "detect",
                                  "text": "please end our chat"}))
        sentences: list[str] = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(60):
                while True:
                    data = await ws.recv()
                    if isinstance(data, str) and (m := json.loads(data)).get("state") == "sentence_start":
                        sentences.append(m["text"])
        assert ws.close_code == 1000 and ws.close_reason == "session.closed"
        assert sentences == ["Goodbye!"]


# ------------------------------------------------------- MCP over streamable HTTP
MCP_TOKEN = "mcp-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def http_mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The fake MCP server in its own process, serving streamable HTTP behind
    a bearer token → its URL and the file it writes when a call is cancelled."""
    import os
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("mcp-http")
    marker, log = folder / "cancelled", (folder / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.mcp_server", "--http-port", str(port),
                             "--token", MCP_TOKEN], cwd=ROOT, env={**os.environ, "VA_MCP_MARKER": str(marker)},
                            stdout=log, stderr=subprocess.STDOUT)  # a file: a pipe nobody reads can fill up
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the fake MCP server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the fake MCP server never listened")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp", marker
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _http_server(url: str, **update: Any) -> MCPServerConfig:
    return MCPServerConfig(name="web", transport="http", url=url, timeout_s=30,
                           headers={"Authorization": f"Bearer {MCP_TOKEN}"}).model_copy(update=update)


async def test_http_mcp_tools_listed_called_failed_and_timed_out(http_mcp: tuple[str, Path]) -> None:
    """The stdio checks again over the streamable-HTTP transport, with the configured headers sent."""
    url, marker = http_mcp
    source = LocalSource([_http_server(url)])
    tools = SessionTools(default_registry(), ToolContext(), ToolsConfig(call_timeout_s=5), remote=source)
    await tools.prepare(wait_s=30)
    assert {"web__add", "web__shout", "web__fail", "web__slow", "get_time"} <= set(tools.names())
    assert await tools.run(ToolCall(id="1", name="web__add", arguments={"a": 2, "b": 40})) == "42"
    assert await tools.run(ToolCall(id="2", name="web__shout", arguments={"text": "hi"})) == "HI!"
    # the server's isError result, its text as the error (the SDK keeps an unexpected exception's own words back)
    assert "tool fail" in json.loads(await tools.run(ToolCall(id="3", name="web__fail")))["error"]
    assert "must be a integer" in json.loads(await tools.run(
        ToolCall(id="4", name="web__add", arguments={"a": "2", "b": 1})))["error"]
    slow = SessionTools(default_registry(), ToolContext(), ToolsConfig(call_timeout_s=0.3), remote=source)
    await slow.prepare(wait_s=30)
    assert "0.3 s" in json.loads(await slow.run(ToolCall(id="5", name="web__slow", arguments={"seconds": 5})))["error"]
    for _ in range(50):  # the client told the server to stop the call it gave up on
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.read_text() == "cancelled"
    # the connection survives the timeout: the next call is answered
    assert await tools.run(ToolCall(id="6", name="web__add", arguments={"a": 1, "b": 1})) == "2"
    limited = MCPManager([_http_server(url, name="calc", allowed_tools=["add"])])
    try:
        assert [s.name for s in await limited.specs()] == ["calc__add"]
    finally:
        await limited.aclose()


async def test_an_http_mcp_server_that_refuses_the_client_is_left_out(http_mcp: tuple[str, Path]) -> None:
    url, _ = http_mcp
    refused = MCPManager([_http_server(url, name="badkey", headers={"Authorization": "Bearer wrong"}, timeout_s=5)])
    try:
        assert await refused.specs() == []  # logged and left out; listed again next time
        with pytest.raises(ToolError, match="unknown MCP tool"):
            await refused.call("badkey__add", {"a": 1, "b": 2}, 5)
    finally:
        await refused.aclose()
