"""What is worth remembering from one utterance, and when two wordings are
one fact: the memory policy (actors/agent/memory.py stores what it picks).

Deterministic on purpose: the same utterance always yields the same
memories, in English and Chinese, with no model call on the turn's path.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, NamedTuple

Source = Literal["user", "policy"]
"""`user`: asked for explicitly (pinned); `policy`: a self-statement the policy kept."""


def normalize(text: str) -> str:
    """The form two restatements of one fact share: NFKC, case-folded,
    punctuation dropped, spacing folded ("My name is Alice." == "my name is alice")."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PZC" else c for c in folded)
    return " ".join(kept.split())


def overlap(a: set[str], b: set[str]) -> float:
    """Jaccard similarity of two token sets; 0 when either is empty."""
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


class Candidate(NamedTuple):
    text: str
    source: Source
    """`user` for an explicit request (pinned), `policy` for a self-statement."""


_SENTENCES = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])|\n+")
_EXPLICIT_EN = re.compile(
    r"^(?:(?:ok(?:ay)?|so|and|also|hey|please)[,\s]+)*"
    r"(?:(?:can|could|would|will) you\s+)?(?:please\s+)?"
    r"(?:remember|don't forget|do not forget|make a note|note)\b[:,]?\s*(?:that\b[:,]?\s*)?(?P<fact>.+)$",
    re.I)
_QUESTION_WORDS = re.compile(r"^(?:what|when|where|who|whom|why|how|which|whether|if|me|this|it)\b", re.I)
"""'Can you remember what I said?' asks; 'remember me' and 'remember this' name no fact."""
_EXPLICIT_ZH = re.compile(r"^(?:请|麻烦|帮我|你要|你要帮我|请你|请帮我)?(?:记住|记一下|记下|别忘了|不要忘记)[:：，,\s]*(?P<fact>.+)$")
_SELF_EN = re.compile(
    r"(?<![\w'])(?:my name is|my name's|call me|i live in|i'm from|i am from|i come from|my birthday is"
    r"|i'm allergic to|i am allergic to|i work (?:at|as|for)|my (?:wife|husband|partner|son|daughter|dog|cat)(?:'s| is)"
    r"(?: called| named)?)\s+\S",
    re.I)
_SELF_ZH = re.compile(r"(?:我叫|我的名字是|我的名字叫|我住在|我家在|我的生日是|我对.{1,12}过敏)")
_TRAILING = re.compile(r"(?:[\s,，、]+(?:and|but|so|而且|并且|和|但是)?)+$", re.I)
_MAX_INPUT_CHARS = 4000


def extract_memories(user_text: str, policy: Literal["off", "explicit", "auto"] = "auto",
                     max_chars: int = 500) -> list[Candidate]:
    """Facts worth keeping from one user utterance, deterministically.

    Catches, per sentence: explicit requests at the start of a sentence
    ("remember that …", "please remember …", "don't forget …", "记住…",
    "请记住…", "帮我记一下…") → the rest of the sentence, source `user`; and,
    with `policy="auto"` (persona `memory: auto`), simple self-statements
    ("my name is …", "call me …", "I live in …", "I'm from …", "my birthday
    is …", "I'm allergic to …", "I work at …", "my wife is …", "我叫…",
    "我住在…", "我的生日是…") → the clause, source `policy`.

    Does not catch: facts stated any other way ("Alice here", "I moved to
    Paris", "我是北京人"), questions and negations ("my name isn't Bob" is
    kept only if it matches a pattern literally; a sentence ending in "?" is
    skipped for self-statements), facts spread over several sentences,
    anything in a language other than English and Chinese, and corrections
    ("my name is Bob, not Alice" is stored beside an older "my name is
    Alice"; dedup merges only near-identical wording). Pronouns are kept as
    spoken ("my wife is Anna"): the prompt says these are the user's words.
    Candidates longer than `max_chars` are dropped, not cut, so a truncated
    fact never changes meaning.
    """
    if policy == "off" or not isinstance(user_text, str):
        return []
    found: list[Candidate] = []
    seen: set[str] = set()

    def add(text: str, source: Source) -> None:
        text = _TRAILING.sub("", " ".join(text.split())).strip(" .。!！")
        key = normalize(text)
        if len(key) >= 2 and len(text) <= max_chars and key not in seen:
            seen.add(key)
            found.append(Candidate(text, source))

    for sentence in _SENTENCES.split(user_text[:_MAX_INPUT_CHARS]):
        sentence = sentence.strip()
        if not sentence:
            continue
        explicit = _EXPLICIT_EN.match(sentence) or _EXPLICIT_ZH.match(sentence)
        if explicit:
            fact = explicit.group("fact").strip()
            if not _QUESTION_WORDS.match(fact):
                add(fact.rstrip("?？"), "user")
            continue
        if policy != "auto" or sentence.endswith(("?", "？")):
            continue
        starts = sorted({m.start() for m in _SELF_EN.finditer(sentence)} | {m.start() for m in _SELF_ZH.finditer(sentence)})
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(sentence)
            add(sentence[start:end], "policy")
    return found
