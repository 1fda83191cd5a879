"""What the control panel knows of providers beyond the pools, without Ray:
each process's per-provider call counters as a failover chain keeps them
(actors/providers/adapters/usage.py), and how the panel sums the live
sessions' reports into one row per provider (actors/ingress/admin.py,
`provider_rows`). The same through real session actors and the admin API:
tests/test_admin_panel.py."""

from __future__ import annotations

from actors.ingress.admin import provider_rows
from actors.providers.adapters.fallback import FallbackLLM, FallbackSTT
from actors.providers.base import ProviderError
from tests.test_failover import LiveSTT, ScriptedLLM, chain_of


async def test_a_chain_counts_calls_in_flight_and_failures_per_provider():
    """What a session reports: an attempt is in flight until it ends, however
    it ends (answered, failed, a reply cut mid-stream, an utterance cancelled)."""
    chain, _ = chain_of("llm", ScriptedLLM(error=ProviderError("llm.unavailable", "HTTP 503")),
                        ScriptedLLM("the backup answers at length"))
    stream = FallbackLLM(chain).stream([], [])
    assert (await stream.__anext__()).text == "the "
    primary, backup = (link.usage.snapshot() for link in chain.links)
    assert (primary["calls"], primary["in_flight"], primary["failures"]) == (1, 0, 1)
    assert (backup["calls"], backup["in_flight"], backup["failures"]) == (1, 1, 0)
    await stream.aclose()  # the reply is cut (an interrupt)
    backup = chain.links[1].usage.snapshot()
    assert backup["in_flight"] == 0 and backup["latency_ms"]["n"] == 1 and backup["failures"] == 0

    chain, _ = chain_of("stt", LiveSTT("what is twelve times seven"))
    usage = chain.links[0].usage
    heard = FallbackSTT(chain).open_stream()
    assert usage.snapshot()["in_flight"] == 1  # an utterance is being recognised
    await heard.push(b"\0\0" * 160)
    assert await heard.finish() == "what is twelve times seven"
    assert usage.snapshot()["in_flight"] == 0  # ended by its final, not when the stream is dropped
    cancelled = FallbackSTT(chain).open_stream()
    await cancelled.cancel()
    assert usage.snapshot()["calls"] == 2 and usage.snapshot()["in_flight"] == 0


def test_provider_rows_sum_the_live_sessions_reports():
    def report(state, calls, in_flight, failures, mean, p95, n, error=None):
        return {"state": state, "consecutive_failures": failures, "opened": int(state == "open"),
                "last_error": error, "calls": calls, "in_flight": in_flight, "failures": failures,
                "latency_ms": {"mean": mean, "p50": mean, "p95": p95, "n": n}}

    chains = {"stt": ["dashscope", "local-whisper"], "llm": ["openai-compatible"], "tts": ["dashscope"]}
    sessions = [
        {"providers": {"llm:openai-compatible": report("open", 3, 0, 2, 100.0, 150.0, 3, "llm.rate_limited: 429"),
                       "stt:dashscope": report("closed", 2, 1, 0, 800.0, 900.0, 1)}},
        {"providers": {"llm:openai-compatible": report("closed", 1, 1, 0, 300.0, 300.0, 1),
                       "llm:my.plugin:Brain": report("half_open", 1, 0, 1, 50.0, 50.0, 1)}},
        {"state": "unreachable"},  # no report: counted nowhere
    ]
    rows = provider_rows(chains, sessions)
    assert [(r["kind"], r["provider"], r["role"]) for r in rows] == [
        ("stt", "dashscope", "primary"), ("stt", "local-whisper", "fallback"), ("llm", "openai-compatible", "primary"),
        ("tts", "dashscope", "primary"), ("llm", "my.plugin:Brain", None)]
    by = {(r["kind"], r["provider"]): r for r in rows}
    llm = by[("llm", "openai-compatible")]
    assert (llm["state"], llm["open_in"], llm["sessions"]) == ("open", 1, 2)  # the worst breaker, and where
    assert (llm["calls"], llm["in_flight"], llm["failures"], llm["opened"]) == (4, 1, 2, 1)
    assert llm["last_error"] == "llm.rate_limited: 429"
    assert llm["latency_ms"] == {"mean": 150.0, "p95": 300.0, "n": 4}  # mean over every call; worst p95
    unused = by[("stt", "local-whisper")]
    assert unused["state"] is None and unused["sessions"] == 0 and unused["calls"] == 0
    assert by[("llm", "my.plugin:Brain")]["state"] == "half_open" and by[("llm", "my.plugin:Brain")]["half_open_in"] == 1
