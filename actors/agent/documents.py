"""Knowledge documents: curated YAML entries, and Markdown, text and PDF cut
into chunks small enough for a prompt, each with where it came from.
Every reader has a size limit: sources come from configuration and from
documents uploaded over HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from actors.agent.bm25 import fold

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
SOURCE_SEP = " › "


# ------------------------------------------------ curated entries (the offline engine's)
@dataclass
class KnowledgeEntry:
    id: str
    title: str
    text: str
    aliases: list[str] = field(default_factory=list)
    location: str | None = None


def read_limited(path: Path, limit: int = MAX_SOURCE_BYTES) -> str:
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size} bytes is over the {limit}-byte limit")
    return path.read_text(encoding="utf-8")


def load_entries(path: str | Path) -> tuple[str, list[KnowledgeEntry]]:
    """(name, entries) of a curated YAML knowledge file."""
    path = Path(path)
    data = yaml.safe_load(read_limited(path)) or {}
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
    folded = re.sub(r"[^a-z0-9\u3400-\u9fff]+", "-", fold(text)).strip("-")
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
        return chunk_text(read_limited(path), path.name, markdown=suffix != ".txt", max_chars=max_chars,
                          overlap=overlap)
    raise ValueError(f"{path}: unsupported knowledge source (use one of {', '.join(SOURCE_SUFFIXES)})")
