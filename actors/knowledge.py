"""A small retrieval index over the configured knowledge base.

The offline dialogue engine has no language model, so its answers about the
venue are retrieved verbatim from curated text. BM25 over a dozen to a few
hundred entries is instant, deterministic and needs no model files; title and
alias hits weigh more because a visitor usually names the thing they ask about.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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

_FIELD_WEIGHTS = {"title": 3.0, "aliases": 2.5, "text": 1.0}
_K1 = 1.2
_B = 0.75


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


@dataclass
class KnowledgeEntry:
    id: str
    title: str
    text: str
    aliases: list[str] = field(default_factory=list)
    location: str | None = None


class KnowledgeBase:
    """Entries plus a BM25F index (per-field length normalisation, weighted
    fields), built once at load time."""

    def __init__(self, entries: list[KnowledgeEntry], name: str = "") -> None:
        self.name = name
        self.entries = entries
        self._fields: list[dict[str, list[str]]] = [
            {"title": tokenize(e.title), "aliases": tokenize(" ".join(e.aliases)), "text": tokenize(e.text)}
            for e in entries
        ]
        n = max(len(entries), 1)
        self._avg_len = {f: max(sum(len(d[f]) for d in self._fields) / n, 1.0) for f in _FIELD_WEIGHTS}
        df: dict[str, int] = {}
        for doc in self._fields:
            for term in set().union(*doc.values()):
                df[term] = df.get(term, 0) + 1
        self._idf = {t: math.log(1 + (len(entries) - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeBase:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        entries = []
        for raw in data.get("entries", []):
            entries.append(
                KnowledgeEntry(
                    id=str(raw["id"]),
                    title=str(raw["title"]),
                    text=" ".join(str(raw["text"]).split()),
                    aliases=[str(a) for a in raw.get("aliases") or []],
                    location=raw.get("location"),
                )
            )
        ids = [e.id for e in entries]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{path}: duplicate entry ids")
        return cls(entries, name=str(data.get("name", "")))

    def titles(self) -> list[str]:
        return [e.title for e in self.entries]

    def get(self, entry_id: str) -> KnowledgeEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def search(self, query: str, k: int = 3) -> list[tuple[KnowledgeEntry, float]]:
        """Best `k` entries with a positive score, best first; ties keep file
        order so answers never flip between runs."""
        terms = tokenize(query)
        if not terms:
            return []
        scored: list[tuple[float, int]] = []
        for i, doc in enumerate(self._fields):
            score = 0.0
            for term in set(terms):
                idf = self._idf.get(term)
                if idf is None:
                    continue
                tf = 0.0
                for f, weight in _FIELD_WEIGHTS.items():
                    count = doc[f].count(term)
                    if count:
                        norm = 1 - _B + _B * len(doc[f]) / self._avg_len[f]
                        tf += weight * count / norm
                score += idf * tf * (_K1 + 1) / (tf + _K1)
            if score > 0:
                scored.append((score, i))
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [(self.entries[i], round(score, 6)) for score, i in scored[:k]]
