"""Words to index and BM25F over them: the ranking the knowledge base, the
knowledge index and long-term memory share (actors/agent/knowledge.py,
actors/agent/memory.py).

Chinese has no spaces, so it is indexed as character bigrams (兵马俑 is found
in 兵马俑在哪里 without a segmenter).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

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


def fold(text: str) -> str:
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
    text = re.sub(r"['’]s\b", "", fold(text))
    tokens: list[str] = []
    for run in _TOKEN_RUNS.findall(text):
        if run[0] >= "\u3400":
            tokens.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
        elif run not in STOPWORDS and len(run) > 1:
            tokens.append(stem(run))
    return tokens


# ---------------------------------------------------------------- BM25F core
FIELD_WEIGHTS = {"title": 3.0, "aliases": 2.5, "text": 1.0}
"""Title and alias hits weigh more: a visitor usually names the thing."""


class BM25F:
    """BM25F (per-field length normalisation, weighted fields) over token
    fields, with an inverted index so a query touches only the documents that
    share a term with it."""

    def __init__(self, docs: Sequence[dict[str, list[str]]], *, min_corpus: int = _MIN_CORPUS) -> None:
        """`min_corpus`: idf as if there were at least this many documents
        (1: plain BM25 idf, as a user's memories are scored)."""
        n = max(len(docs), 1)
        self._lens = [{f: len(d.get(f, ())) for f in FIELD_WEIGHTS} for d in docs]
        self._avg = {f: max(sum(lens[f] for lens in self._lens) / n, 1.0) for f in FIELD_WEIGHTS}
        self._postings: dict[str, list[tuple[int, dict[str, int]]]] = {}
        for i, doc in enumerate(docs):
            per_term: dict[str, dict[str, int]] = {}
            for f in FIELD_WEIGHTS:
                for term, count in Counter(doc.get(f, ())).items():
                    per_term.setdefault(term, {})[f] = count
            for term, counts in per_term.items():
                self._postings.setdefault(term, []).append((i, counts))
        n_idf = max(len(docs), min_corpus)
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
                    tf += FIELD_WEIGHTS[f] * count / norm
                out[i] = out.get(i, 0.0) + idf * tf * (_K1 + 1) / (tf + _K1)
        return out


def ranked(scores: dict[int, float], k: int) -> list[tuple[int, float]]:
    """Best first; ties keep corpus order so answers never flip between runs."""
    return sorted(((i, s) for i, s in scores.items() if s > 0), key=lambda p: (-p[1], p[0]))[:k]
