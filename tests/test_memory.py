"""Long-term memory (issue 10 item 3): the store on SQLite and on a real
PostgreSQL server, the policy extractor and the HTTP handlers. No Ray.

The PostgreSQL params run against the throwaway server of tests/pg.py
(fixture `pg_server`, one per test session); without the binaries
(`apt-get install postgresql`) they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from actors.agent import memory_api
from actors.agent.db import Database, DatabaseError, redact_url, to_numbered
from actors.agent.memory import MemoryConfig, MemoryStore, MemoryStoreError
from actors.agent.memory_policy import Candidate, extract_memories
from tests.pg import PG_USER, free_port, fresh_pg_schema

ALICE, BOB, DEVICE = "user:alice", "user:bob", "device:aa:bb:cc:dd:ee:ff"
PG_PASSWORD_ENV = "VA_TEST_MEMORY_DSN"


# --------------------------------------------------------------------------- store factory

StoreFactory = Callable[..., MemoryStore]


@pytest.fixture(params=["sqlite", "postgresql"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """→ make(**config, clock=...) building stores on one database per test:
    a file under tmp_path, or a fresh database on the PostgreSQL server whose
    DSN (with its password) reaches the store through `url_env` only."""
    env: dict[str, str] = {}
    if request.param == "sqlite":
        base = MemoryConfig(url=f"sqlite:///{tmp_path}/memory.sqlite3")
    else:
        server = request.getfixturevalue("pg_server")
        env[PG_PASSWORD_ENV] = await fresh_pg_schema(server["dsn"])
        base = MemoryConfig(url="postgresql://nobody@127.0.0.1:1/unused", url_env=PG_PASSWORD_ENV)
    made: list[MemoryStore] = []

    def make(clock: Callable[[], float] | None = None, **overrides: Any) -> MemoryStore:
        config = base.model_copy(update=overrides)
        store = MemoryStore(config, env=env, **({"clock": clock} if clock else {}))
        made.append(store)
        return store

    make.backend = request.param  # type: ignore[attr-defined]
    yield make
    for store in made:
        await store.close()


class Clock:
    """A clock that moves one second per reading, so every write has its own time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


# --------------------------------------------------------------------------- the store


MEMORIES = ["My daughter Emma is allergic to peanuts", "I live in Paris near the Louvre",
            "My favourite opera is Tosca by Puccini"]


def plain_bm25(query: str, texts: list[str], i: int, k1: float = 1.2, b: float = 0.75) -> float:
    """Textbook BM25 of `texts[i]` for `query`, idf over `texts`."""
    from actors.agent.bm25 import tokenize

    docs = [tokenize(t) for t in texts]
    avg = sum(map(len, docs)) / len(docs)
    score = 0.0
    for term in dict.fromkeys(tokenize(query)):
        df = sum(term in d for d in docs)
        tf = docs[i].count(term)
        if tf:
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(docs[i]) / avg))
    return score


async def test_remember_and_recall_by_relevance(make_store: StoreFactory) -> None:
    store = await make_store().open()
    for text in MEMORIES:
        await store.remember(ALICE, text)
    found = await store.recall(ALICE, "Where do I live?")
    assert [m.text for m in found] == ["I live in Paris near the Louvre"]
    assert found[0].score == pytest.approx(plain_bm25("Where do I live?", MEMORIES, 1), abs=1e-6), \
        "idf over the owner's memories only, not the knowledge base's floor of ten documents"
    found = await store.recall(ALICE, "Can Emma eat peanut butter?", k=2)
    assert found[0].text.startswith("My daughter Emma")
    assert await store.recall(ALICE, "the weather tomorrow") == []
    assert await store.recall(ALICE, "what is it?") == []  # only stopwords: nothing to match


async def test_recall_chinese_with_bigrams(make_store: StoreFactory) -> None:
    store = make_store()
    await store.remember(ALICE, "我住在北京的海淀区")
    await store.remember(ALICE, "我的猫叫咪咪")
    found = await store.recall(ALICE, "北京今天天气怎么样")
    assert [m.text for m in found] == ["我住在北京的海淀区"]
    assert [m.text for m in await store.recall(ALICE, "我的猫叫什么名字")][0] == "我的猫叫咪咪"


async def test_recall_ties_go_to_the_most_recent_and_k_and_min_score(make_store: StoreFactory) -> None:
    store = make_store(clock=Clock())
    older = await store.remember(ALICE, "parking level B2")
    newer = await store.remember(ALICE, "parking level B3")
    found = await store.recall(ALICE, "parking", k=2)
    assert [m.id for m in found] == [newer.id, older.id]
    assert found[0].score == found[1].score
    assert len(await store.recall(ALICE, "parking", k=1)) == 1
    strict = make_store(min_score=100.0)
    assert await strict.recall(ALICE, "parking") == []
    for bad_k in (0, 51, True, "3"):
        with pytest.raises(MemoryStoreError) as err:
            await store.recall(ALICE, "parking", k=bad_k)  # type: ignore[arg-type]
        assert err.value.code == "memory.bad_request"


async def test_restated_fact_updates_instead_of_adding(make_store: StoreFactory) -> None:
    store = make_store(clock=Clock())
    first = await store.remember(ALICE, "My name is Alice.")
    again = await store.remember(ALICE, "  my NAME is alice  ")
    assert again.id == first.id and again.updated > first.updated and again.created == first.created
    assert again.text == "my NAME is alice"
    # High token overlap: the newer, fuller wording replaces the older one.
    long = await store.remember(ALICE, "I live in Beijing")
    longer = await store.remember(ALICE, "I live in Beijing, and she lives there too")
    assert longer.id == long.id and longer.text.endswith("too")
    # Different facts stay apart.
    other = await store.remember(ALICE, "My name is Bob")
    assert other.id != first.id
    assert await store.count(ALICE) == 3
    zh1 = await store.remember(ALICE, "我住在北京")
    zh2 = await store.remember(ALICE, "我住在北京。")
    assert zh1.id == zh2.id


async def test_explicit_restatement_pins_a_policy_memory(make_store: StoreFactory) -> None:
    store = make_store()
    saved = await store.remember(ALICE, "I am allergic to cats", source="policy")
    assert not saved.pinned and saved.source == "policy"
    pinned = await store.remember(ALICE, "I am allergic to cats!", source="user")
    assert pinned.id == saved.id and pinned.pinned and pinned.source == "user"
    still = await store.remember(ALICE, "i am allergic to cats", source="policy")
    assert still.pinned, "a policy restatement never unpins what the user asked for"
    assert (await store.get(ALICE, saved.id)).pinned


async def test_owners_never_see_each_other(make_store: StoreFactory) -> None:
    store = make_store()
    secret = await store.remember(ALICE, "my bank PIN hint is the cat's birthday")
    await store.remember(DEVICE, "the kitchen speaker is in the kitchen")
    assert await store.list(BOB) == []
    assert await store.recall(BOB, "bank PIN cat birthday") == []
    assert (await store.export(BOB))["memories"] == []
    with pytest.raises(MemoryStoreError) as err:
        await store.delete(BOB, secret.id)
    assert err.value.code == "memory.not_found" and err.value.http_status == 404
    with pytest.raises(MemoryStoreError):
        await store.get(BOB, secret.id)
    assert await store.delete_all(BOB) == 0
    assert [m.id for m in await store.list(ALICE)] == [secret.id]
    # A device whose id looks like a user name is not that user (typed principals).
    assert await store.list("device:alice") == []
    # The same fact told by two owners is two memories.
    bobs = await store.remember(BOB, "my bank PIN hint is the cat's birthday")
    assert bobs.id != secret.id and bobs.owner == BOB


async def test_delete_one_and_all(make_store: StoreFactory) -> None:
    store = make_store()
    one = await store.remember(ALICE, "fact one about apples")
    two = await store.remember(ALICE, "fact two about oranges")
    await store.delete(ALICE, one.id)
    assert [m.id for m in await store.list(ALICE)] == [two.id]
    with pytest.raises(MemoryStoreError) as err:
        await store.delete(ALICE, one.id)
    assert err.value.code == "memory.not_found"
    for bad in ("", "x" * 10_000, "' OR 1=1 --", "../etc", two.id.upper()):
        with pytest.raises(MemoryStoreError) as err:
            await store.delete(ALICE, bad)
        assert err.value.code == "memory.not_found"
    await store.remember(ALICE, "fact three about pears")
    assert await store.delete_all(ALICE) == 2
    assert await store.list(ALICE) == [] and await store.count(ALICE) == 0


async def test_export_is_json_and_complete(make_store: StoreFactory) -> None:
    store = make_store(clock=Clock())
    await store.remember(ALICE, "我叫小明", source="policy")
    await store.remember(ALICE, "remember the milk")
    await store.remember(BOB, "not alice's")
    data = await store.export(ALICE)
    text = json.dumps(data, ensure_ascii=False)
    assert json.loads(text) == data
    assert data["format"] == "voice-actors.memories/1" and data["owner"] == ALICE and data["count"] == 2
    assert [m["text"] for m in data["memories"]] == ["remember the milk", "我叫小明"]
    assert set(data["memories"][0]) == {"id", "text", "source", "pinned", "created", "updated"}
    assert "not alice's" not in text


async def test_input_limits(make_store: StoreFactory) -> None:
    store = make_store(max_chars=40)
    for text, code in (("", "memory.empty"), ("   \n\t\x00 ", "memory.empty"), ("x" * 41, "memory.too_long"),
                       ("y" * 5_000_000, "memory.too_long"), (None, "memory.bad_request"),
                       (["a list"], "memory.bad_request")):
        with pytest.raises(MemoryStoreError) as err:
            await store.remember(ALICE, text)  # type: ignore[arg-type]
        assert err.value.code == code
    assert err.value.http_status == 400
    with pytest.raises(MemoryStoreError) as err:
        await store.remember(ALICE, "z" * 41)
    assert err.value.http_status == 413 and "40" in err.value.message
    # Whitespace and control characters are folded before the length counts.
    kept = await store.remember(ALICE, "  spaced \x07 out\n\n" + " " * 100 + "text ")
    assert kept.text == "spaced out text"
    with pytest.raises(MemoryStoreError) as err:
        await store.remember(ALICE, "ok", source="admin")  # type: ignore[arg-type]
    assert err.value.code == "memory.bad_request"
    for owner in ("alice", "", "user:", "group:x", "user:" + "a" * 300, "user:a\nb", None, "anonymous:anonymous"):
        with pytest.raises(MemoryStoreError) as err:
            await store.remember(owner, "a fact")  # type: ignore[arg-type]
        assert err.value.code == "memory.bad_owner" and err.value.http_status == 403
    assert len(await store.recall(ALICE, "spaced " * 10_000)) == 1  # a huge query is cut, not an error
    demo = make_store(allow_anonymous=True)
    assert (await demo.remember("anonymous:anonymous", "demo fact")).owner == "anonymous:anonymous"


async def test_cap_evicts_oldest_unpinned_then_refuses(make_store: StoreFactory) -> None:
    store = make_store(max_per_user=3, clock=Clock())
    old_policy = await store.remember(ALICE, "policy fact alpha", source="policy")
    pinned = await store.remember(ALICE, "pinned fact bravo", source="user")
    newer_policy = await store.remember(ALICE, "policy fact charlie", source="policy")
    fourth = await store.remember(ALICE, "pinned fact delta", source="user")
    ids = {m.id for m in await store.list(ALICE)}
    assert ids == {pinned.id, newer_policy.id, fourth.id}, "the oldest unpinned memory went"
    fifth = await store.remember(ALICE, "policy fact echo", source="policy")
    assert {m.id for m in await store.list(ALICE)} == {pinned.id, fourth.id, fifth.id}
    await store.remember(ALICE, "pinned fact foxtrot", source="user")
    with pytest.raises(MemoryStoreError) as err:
        await store.remember(ALICE, "pinned fact golf", source="user")
    assert err.value.code == "memory.limit" and err.value.http_status == 409
    assert await store.count(ALICE) == 3
    # A restatement is an update, so it still works when full; other owners are not affected.
    assert (await store.remember(ALICE, "Pinned fact bravo.")).id == pinned.id
    assert (await store.remember(BOB, "bob's own fact")).owner == BOB
    assert old_policy.id not in ids


async def test_a_new_store_on_the_same_database_remembers(make_store: StoreFactory) -> None:
    """One session tells a fact; after a restart (a new store object, a new
    connection pool) another session of the same user recalls it."""
    first = await make_store().open()
    told = await first.remember(ALICE, "my car is parked on level B2, spot 17")
    await first.close()
    second = make_store()
    found = await second.recall(ALICE, "where did I park the car?")
    assert [m.id for m in found] == [told.id]
    assert await second.recall(BOB, "where did I park the car?") == []


async def test_concurrent_writers_keep_dedup_and_cap(make_store: StoreFactory) -> None:
    """Two processes' stores (two objects, two connections) racing on one owner."""
    a, b = make_store(max_per_user=5), make_store(max_per_user=5)
    await a.open()
    await b.open()
    same = await asyncio.gather(*(s.remember(ALICE, "the door code is 4321") for s in (a, b) * 4))
    assert len({m.id for m in same}) == 1
    await asyncio.gather(*(s.remember(ALICE, f"policy fact number {w}", source="policy")
                           for s, w in zip((a, b) * 6, ["one", "two", "three", "four", "five", "six",
                                                       "seven", "eight", "nine", "ten", "eleven", "twelve"])))
    assert await a.count(ALICE) == 5
    # Deleting while another replica writes: no deadlock, no error (gather would raise it).
    await asyncio.gather(a.delete_all(ALICE), *(b.remember(ALICE, f"late fact {w}", source="policy")
                                                for w in ("red", "green", "blue")), a.delete_all(ALICE))
    assert await a.count(ALICE) <= 3


async def test_remember_from_follows_the_persona_policy(make_store: StoreFactory) -> None:
    store = make_store()
    assert await store.remember_from(ALICE, "My name is Alice. Remember that I take my tea black.",
                                     policy="off") == []
    saved = await store.remember_from(ALICE, "My name is Alice. Remember that I take my tea black.",
                                      policy="explicit")
    assert [(m.text, m.source) for m in saved] == [("I take my tea black", "user")]
    saved = await store.remember_from(ALICE, "My name is Alice. Remember that I take my tea black.",
                                      policy="auto")
    assert [(m.text, m.source) for m in saved] == [("My name is Alice", "policy"), ("I take my tea black", "user")]
    assert await store.count(ALICE) == 2
    with pytest.raises(MemoryStoreError):
        await store.remember_from("anonymous:x", "remember that nothing", policy="auto")


async def test_the_default_engine_recalls_a_fact_from_an_earlier_session_for_its_owner_only(
        make_store: StoreFactory) -> None:
    """The zero-key engine (`local-dialogue`) reads the memories the prompt builder puts in its
    prompt, as a cloud LLM does: told in one session, recalled in the next; never for another
    owner, nor under a persona whose memory is off, nor once deleted."""
    from actors.config import load_config
    from tests.test_local_brain import ask, local_session

    store = await make_store().open()
    config = load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": ""})

    async def session(owner: str, text: str, memory: str = "explicit") -> str:
        core, q = local_session(f"s-{owner}", config)
        core.use_memory(store, owner)
        core.dialogue.persona = core.dialogue.persona.model_copy(update={"memory": memory})
        try:
            return await ask(core, q, text)
        finally:
            await core.close()

    assert "remember" in await session(ALICE, "Remember that my cat is called Miso.")
    for _ in range(200):  # kept beside the reply, not before it
        if await store.list(ALICE):
            break
        await asyncio.sleep(0.05)
    assert [m.text for m in await store.list(ALICE)] == ["my cat is called Miso"]
    assert await session(ALICE, "What is my cat called?") == "Your cat is called Miso."
    assert "Miso" not in await session(BOB, "What is my cat called?")
    assert "Miso" not in await session(ALICE, "What is my cat called?", memory="off")
    await store.delete_all(ALICE)
    assert "Miso" not in await session(ALICE, "What is my cat called?")


async def test_postgres_password_stays_out_of_reprs(pg_server: dict[str, str]) -> None:
    """The DSN with its password reaches the store through `url_env` only and
    shows up in no repr; the store works with it (scram-sha-256 on TCP)."""
    password = pg_server["password"]
    store = MemoryStore(MemoryConfig(url_env=PG_PASSWORD_ENV),
                        env={PG_PASSWORD_ENV: await fresh_pg_schema(pg_server["dsn"])})
    try:
        await store.remember(ALICE, "a fact")
        assert store.database.dialect == "postgresql"
        assert password not in repr(store) and password not in store.database.display_url
        assert password not in repr(store.database) and "***" in repr(store.database)
    finally:
        await store.close()


async def test_unreachable_database_is_503_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = f"postgresql://{PG_USER}:hunter2secret@127.0.0.1:{free_port()}/postgres"
    dead = MemoryStore(MemoryConfig(url_env="DEAD_DSN"), env={"DEAD_DSN": dsn})
    with pytest.raises(MemoryStoreError) as err:
        await memory_api.list_memories(dead, ALICE)
    assert err.value.code == "memory.unavailable" and err.value.http_status == 503
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "hunter2secret" not in str(err.value) and "hunter2secret" not in caplog.text
    assert "memory store unavailable" in caplog.text


# --------------------------------------------------------------------------- HTTP handlers


async def test_api_handlers(make_store: StoreFactory) -> None:
    store = make_store(clock=Clock())
    added = await memory_api.add_memory(store, ALICE, {"text": "my locker is number 12"})
    memory_id = added["memory"]["id"]
    await memory_api.add_memory(store, ALICE, {"text": "my bike is blue"})
    await memory_api.add_memory(store, BOB, {"text": "bob's thing"})
    page = await memory_api.list_memories(store, ALICE, limit="1", offset="1")
    assert page["total"] == 2 and page["limit"] == 1 and page["offset"] == 1
    assert [m["id"] for m in page["memories"]] == [memory_id]
    assert (await memory_api.list_memories(store, ALICE))["limit"] == memory_api.DEFAULT_PAGE
    exported = await memory_api.export_memories(store, ALICE)
    assert exported["count"] == 2 and json.dumps(exported)
    for limit, offset in (("0", None), ("501", None), ("-1", None), ("1e3", None), ("١", None), (True, None),
                          (None, "9999999999"), (None, "x")):
        with pytest.raises(MemoryStoreError) as err:
            await memory_api.list_memories(store, ALICE, limit=limit, offset=offset)
        assert err.value.code == "memory.bad_request" and err.value.http_status == 400
    for body in (None, [], {"text": 3}, {"text": "x", "owner": BOB}, "text"):
        with pytest.raises(MemoryStoreError) as err:
            await memory_api.add_memory(store, ALICE, body)
        assert err.value.code == "memory.bad_request"
    with pytest.raises(MemoryStoreError) as err:
        await memory_api.add_memory(store, ALICE, {"text": "x" * 501})
    assert err.value.code == "memory.too_long"
    bobs_id = (await memory_api.list_memories(store, BOB))["memories"][0]["id"]
    for bad in (bobs_id, 42, "nope"):
        with pytest.raises(MemoryStoreError) as err:
            await memory_api.delete_memory(store, ALICE, bad)
        assert err.value.code == "memory.not_found" and err.value.to_dict()["error"] == "memory.not_found"
    assert await memory_api.delete_memory(store, ALICE, memory_id) == {"deleted": memory_id}
    assert await memory_api.delete_all_memories(store, ALICE) == {"deleted": 1}
    assert (await memory_api.list_memories(store, BOB))["total"] == 1


async def test_api_when_memory_is_disabled(tmp_path: Path) -> None:
    for store in (None, MemoryStore(MemoryConfig(enabled=False, url=f"sqlite:///{tmp_path}/m.db"))):
        with pytest.raises(MemoryStoreError) as err:
            await memory_api.list_memories(store, ALICE)
        assert err.value.code == "memory.disabled" and err.value.http_status == 404


def test_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(MemoryStoreError("memory.limit", "full")))
    assert (err.code, err.message, err.http_status) == ("memory.limit", "full", 409)


# --------------------------------------------------------------------------- the policy extractor


@pytest.mark.parametrize(("said", "expected"), [
    ("Remember that my sister's birthday is June 3rd. Also book a table.",
     [("my sister's birthday is June 3rd", "user")]),
    ("Please remember my locker code is 1.2.3", [("my locker code is 1.2.3", "user")]),
    ("OK, can you remember that I hate olives?", [("I hate olives", "user")]),
    ("Don't forget: the meeting moved to Friday", [("the meeting moved to Friday", "user")]),
    ("请记住我的车停在B2层。", [("我的车停在B2层", "user")]),
    ("帮我记一下，明天下午三点开会", [("明天下午三点开会", "user")]),
    ("Hi, my name is Alice and I live in Paris.", [("my name is Alice", "policy"), ("I live in Paris", "policy")]),
    ("I'm from Lyon. My birthday is May 5!", [("I'm from Lyon", "policy"), ("My birthday is May 5", "policy")]),
    ("我叫小明，我住在上海。", [("我叫小明", "policy"), ("我住在上海", "policy")]),
    ("Remember that my name is Alice", [("my name is Alice", "user")]),
    ("Can you remember what I said?", []),
    ("Do you remember my name?", []),
    ("Remember me?", []),
    ("Is my name Alice?", []),
    ("What's the weather in Paris?", []),
    ("I moved to Paris last year", []),
    ("", []),
])
def test_extract_memories(said: str, expected: list[tuple[str, str]]) -> None:
    assert [tuple(c) for c in extract_memories(said)] == expected


def test_extract_memories_policies_and_bounds() -> None:
    said = "My name is Alice. Remember that I take my tea black."
    assert extract_memories(said, "off") == []
    assert extract_memories(said, "explicit") == [Candidate("I take my tea black", "user")]
    assert len(extract_memories(said, "auto")) == 2
    assert extract_memories("remember that " + "x" * 600) == []  # too long: dropped, not cut
    assert extract_memories("remember that a b. remember that A B!") == [Candidate("a b", "user")]
    assert extract_memories(None) == []  # type: ignore[arg-type]
    huge = "my name is Al. " * 100_000
    assert extract_memories(huge) == [Candidate("my name is Al", "policy")]


# --------------------------------------------------------------------------- config and driver layer


def test_config_urls(tmp_path: Path) -> None:
    from actors.config import PROJECT_ROOT

    default = MemoryStore(MemoryConfig())
    assert default.database.display_url == f"sqlite:///{PROJECT_ROOT / 'data' / 'memory.sqlite3'}"
    absolute = MemoryStore(MemoryConfig(url=f"sqlite:///{tmp_path}/x.db"))
    assert absolute.database.display_url == f"sqlite:///{tmp_path}/x.db"
    config = MemoryConfig(url_env="MY_MEMORY_DSN")
    assert config.resolved_url({}) == config.url
    assert config.resolved_url({"MY_MEMORY_DSN": ""}) == config.url
    assert config.resolved_url({"MY_MEMORY_DSN": "postgresql://u:pw@h/db"}) == "postgresql://u:pw@h/db"
    store = MemoryStore(config, env={"MY_MEMORY_DSN": "postgresql://u:s3cret@h/db"})
    assert store.database.dialect == "postgresql" and "s3cret" not in repr(store)
    with pytest.raises(ValueError):
        MemoryConfig(surprise=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        MemoryConfig(url_env="not a name; rm -rf")
    for url in ("mysql://u:s3cret@h/db", "sqlite:///:memory:", "sqlite://relative"):
        with pytest.raises(DatabaseError) as err:
            Database(url)
        assert "s3cret" not in str(err.value)


def test_driver_helpers() -> None:
    assert to_numbered("SELECT * FROM t WHERE a = ? AND b = '?' AND c = ?") == \
        "SELECT * FROM t WHERE a = $1 AND b = '?' AND c = $2"
    assert to_numbered("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"
    assert redact_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_sqlite_transaction_rolls_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/t.db")
    await db.create_schema(["CREATE TABLE IF NOT EXISTS t (v TEXT)"])
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES (?)", "gone")
            raise RuntimeError("boom")
    assert await db.execute("INSERT INTO t (v) VALUES (?)", "kept") == 1
    assert await db.fetch("SELECT v FROM t") == [{"v": "kept"}]


async def test_sqlite_keeps_one_connection_and_replaces_a_broken_one(tmp_path: Path) -> None:
    """One connection serves every transaction in the loop (a connect per
    transaction cost a thread start on every save); one left in an unknown
    state is replaced, and another event loop gets connections of its own."""
    db = Database(f"sqlite:///{tmp_path}/t.db")
    await db.create_schema(["CREATE TABLE IF NOT EXISTS t (v TEXT)"])
    kept = db._kept
    assert kept is not None
    await asyncio.gather(*(db.execute("INSERT INTO t (v) VALUES (?)", str(i)) for i in range(20)))  # taken in turn
    assert db._kept is kept and len(await db.fetch("SELECT v FROM t")) == 20

    await kept.conn.close()  # gone under it (as if its thread had died): BEGIN fails
    with pytest.raises(Exception):
        await db.execute("INSERT INTO t (v) VALUES (?)", "lost")
    assert db._kept is None
    assert await db.execute("INSERT INTO t (v) VALUES (?)", "after") == 1  # a fresh connection
    assert db._kept is not None and db._kept is not kept

    def other_loop() -> list[dict[str, str]]:
        return asyncio.run(db.fetch("SELECT v FROM t WHERE v = ?", "after"))

    assert await asyncio.to_thread(other_loop) == [{"v": "after"}]
    await db.close()
    assert db._kept is None


async def test_a_session_actor_keeps_its_stores_open_across_sessions(tmp_path: Path) -> None:
    """actors/session_stores.py: the stores a session actor hands each session
    it hosts stay open for the next; other databases in a new config get new ones."""
    from actors.config import load_config
    from actors.session_stores import ActorStores

    def config(name: str, memory: bool = True) -> Any:
        return load_config(env={"VOICE_ACTORS__SESSION__HISTORY_DB": str(tmp_path / f"{name}.sqlite3"),
                                "VOICE_ACTORS__MEMORY__URL": f"sqlite:///{tmp_path / name}-memory.sqlite3",
                                "VOICE_ACTORS__MEMORY__ENABLED": str(memory).lower()})

    stores = ActorStores()
    a, b = config("a"), config("b")
    history = stores.history(a)
    assert history is not None and stores.history(a) is history  # the next session: the same store
    memory = await stores.memory(a)
    assert memory is not None and await stores.memory(a) is memory
    assert stores.history(b) is not history and await stores.memory(b) is not memory  # other databases
    assert await stores.memory(config("c", memory=False)) is None

    (tmp_path / "blocker").write_text("a file where a directory should be")
    broken = load_config(env={"VOICE_ACTORS__MEMORY__URL": f"sqlite:///{tmp_path}/blocker/memory.sqlite3",
                              "VOICE_ACTORS__MEMORY__ENABLED": "true"})
    with pytest.raises(DatabaseError):
        await stores.memory(broken)
    assert await stores.memory(b) is not None  # and the next session tries again, afresh
    await stores.close()
    await asyncio.sleep(0.1)  # the stores replaced above close in the background
