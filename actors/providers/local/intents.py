"""What the offline dialogue reads in a transcript: arithmetic, timer
lengths and labels, a name or a fact to remember, and the patterns that
tell one intent from another. Whisper's habits (digits, a comma for a pause,
"12th time 7" for "twelve times seven") are handled here, so the engine
(dialogue.py) decides only what to answer."""

from __future__ import annotations

import re

from actors.agent.builtin_tools import normalize_key
from actors.providers.local.phrasing import words_to_digits

# ------------------------------------------------------------ text rules
_TRAILING = re.compile(r"[\s.!?,;:]+$")


def clean(text: str) -> str:
    """Whisper output → one tidy line: no '[BLANK_AUDIO]'/'(music)' tags,
    straight apostrophes, single spaces, no final punctuation."""
    text = re.sub(r"\[[^\]]*\]|\((?:[A-Za-z\s]+)\)", " ", text)
    text = text.replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    text = " ".join(text.split())
    return _TRAILING.sub("", text)


def math_text(lower: str) -> str:
    """Lower-case transcript with number words as digits and operator words
    as symbols, for the arithmetic and timer rules."""
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", words_to_digits(lower))
    t = re.sub(r"-(?=[a-z])", " ", t)
    for pattern, symbol in (
        (r"\bmultiplied by\b|\btimes\b", " * "),
        # Whisper tiny hears "twelve times seven" as "12th time 7" or "12, time 7" now and then (CI)
        (r"(?<=\d)(?:st|nd|rd|th)?,?\s+time\b(?=\s*\d)", " * "),
        (r"(?<=\d)\s*[x×]\s*(?=\d)", " * "),
        (r"\bdivided by\b|\bover\b|÷", " / "),
        (r"\bplus\b", " + "),
        (r"\bminus\b|\btake away\b|\bnegative\b", " - "),
        (r"\bsquared\b", " ** 2 "),
        (r"\bcubed\b", " ** 3 "),
        (r"\b(?:to the power of|raised to the power of|raised to)\b", " ** "),
        (r"\bmod(?:ulo)?\b", " % "),
        (r"\^", " ** "),
    ):
        t = re.sub(pattern, symbol, t)
    # a pause Whisper wrote as a comma: "12, times 7"
    return re.sub(r"(?<=\d),(?=\s*(?:\*\*|[-+*/%]))", "", t)


_BINARY = re.compile(r"[\d)]\s*(?:\*\*|[-+*/%])\s*[-+(]*\s*\d")


def find_expression(lower: str) -> str | None:
    """The longest arithmetic span in the transcript, e.g. '12 * 7'."""
    best = None
    for m in re.finditer(r"[-+(]*\s*\d[\d.\s()+\-*/%]*", math_text(lower)):
        expr = re.sub(r"[\s.+\-*/%(]+$", "", m.group()).strip()
        expr = " ".join(expr.split())
        if _BINARY.search(expr) and (best is None or len(expr) > len(best)):
            best = expr
    return best


_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(
    r"\b(?P<n>\d+(?:\.\d+)?(?:\s+and a half)?|half an?|an?)[\s-]*"
    r"(?P<unit>days?|hours?|hrs?|minutes?|mins?|seconds?|secs?)\b"
)
_NOT_LABELS = {"new", "quick", "countdown", "the", "a", "an", "my", "one", "second", "minute", "hour", "day"}


def parse_timer(lower: str) -> tuple[float | None, str]:
    """(seconds or None, label) from 'set a timer for 1 hour and 30 minutes
    for the pasta'."""
    t = math_text(lower)
    total, last_end = 0.0, None
    for m in _DURATION.finditer(t):
        raw = m.group("n")
        if raw.startswith("half"):
            n = 0.5
        elif raw in ("a", "an"):
            n = 1.0
        else:
            n = float(raw.split()[0]) + (0.5 if "half" in raw else 0.0)
        total += n * _UNIT_S[m.group("unit")[0]]
        last_end = m.end()
    label = ""
    if last_end is not None:
        tail = _TRAILING.sub("", t[last_end:])
        lm = re.match(r"^\s*(?:,\s*)?(?:for|called|named|labell?ed|to)\s+(?:the\s+|my\s+)?([a-z][a-z' ]{0,40})$", tail)
        if lm and lm.group(1).strip() not in ("please", "me"):
            label = lm.group(1).strip()
    if not label:
        lm = re.search(r"\b(?:an?|the|my)\s+([a-z]+)\s+timer\b", t)
        if lm and lm.group(1) not in _NOT_LABELS:
            label = lm.group(1)
    return (total if last_end is not None else None), label


_NAME_STOP = {"and", "but", "so", "i", "nice", "what", "please", "by", "from", "the", "how", "can", "who", "it"}


def name_from(text: str) -> str:
    """First one to three name-like words: 'Ana and I like dinosaurs' → 'Ana'."""
    words = []
    for w in re.findall(r"[^\W\d_][\w'-]*|\S", text):
        if not re.match(r"[^\W\d_]", w) or w.lower() in _NAME_STOP or len(words) == 3:
            break
        words.append(w if not w.islower() else w.capitalize())
    return " ".join(words)


def _verb_for(key: str) -> str:
    return "are" if key.endswith("s") and not key.endswith("ss") else "is"


def fact_phrase(key: str, value: str) -> str:
    """'name','Ana' → 'your name is Ana'; a free-form note reads back as said."""
    if normalize_key(value) == key:
        return value
    return f"your {key} {_verb_for(key)} {value}"


# ------------------------------------------------------------ patterns
PATTERNS = {
    "remember_name": re.compile(
        r"(?:\bmy name(?:'s| is)|^(?:please |you can |just )?call me|^i'm called|^i am called)\s+(?P<rest>.+)$", re.I
    ),
    "remember": re.compile(
        r"^(?:(?:please|okay|ok|and|also|so)[, ]+)*(?:can you |could you |would you |please )?"
        r"(?:remember|don't forget|do not forget|note|make a note)\s+(?:that\s+)?(?P<fact>.+)$",
        re.I,
    ),
    "fact_split": re.compile(r"^(?P<key>.+?)\s+(?:is|are|was|were)\s+(?P<value>.+)$", re.I),
    "recall_all": re.compile(
        r"\bwhat (?:do|did) you (?:remember|know about me)\b|\bwhat have i told you\b|\bwhat did i tell you\b"
        r"|\bwhat have you remembered\b|\bwhat(?:'s| is) in your memory\b"
    ),
    "recall_key": re.compile(
        r"^(?:(?:and|so|okay|ok)[, ]+)?"
        r"(?:what(?:'s| is| was| are| were)|do you (?:know|remember)|tell me|remind me(?: of)?)"
        r"\s+my\s+(?P<key>[a-z0-9' ]+?)(?:\s+again)?$"
    ),
    "recall_what_my": re.compile(r"\bwhat my (?P<key>[a-z0-9' ]+?) (?:is|was|are|were)$"),
    "who_am_i": re.compile(r"\bwho am i\b"),
    "timer": re.compile(r"\btimers?\b|\bcount ?down\b|\bremind me in\b"),
    "timer_cancel": re.compile(r"\b(?:cancel|stop|delete|remove|turn off|how much time)\b"),
    "time": re.compile(
        r"\bwhat(?:'s| is)? the time\b|\bwhat time is it\b|\bwhat time it is\b|\btell me the time\b"
        r"|\bcurrent time\b|\bthe time now\b|\bhave the time\b|\btime is it\b"
    ),
    "date": re.compile(
        r"\bwhat(?:'s| is)? (?:the |today's )?date\b|\btoday's date\b|\bdate today\b|\bwhat day is (?:it|today)\b"
        r"|\bwhat day of the week\b|\bwhich day is (?:it|today)\b|\bwhat is today\b|\bwhat year is it\b"
    ),
    "help": re.compile(
        r"\bwhat can you do\b|\bwhat do you do\b|\bhow can you help\b|\bwhat can i ask\b|\bwho are you\b"
        r"|\bwhat are you\b|^help(?: me)?$|\bwhat are your (?:skills|features)\b"
        r"|\bare you an? (?:ai|robot|llm|language model)\b"
    ),
    "list": re.compile(
        r"\bwhat can i see\b|\bwhich exhibits?\b|\bwhat exhibits?\b|\blist (?:the |all |your )?exhibits?\b"
        r"|\bwhat(?:'s| is) on (?:display|show)\b|\bwhat do you have\b|\bwhat should i see\b|\bwhat is there to see\b"
        r"|\b(?:tell me about|show me) (?:the |your |all )?exhibits\b|\ball (?:the |your )?exhibits\b"
    ),
    "how_are_you": re.compile(r"^(?:and )?how are you(?: doing| today)?$|^how's it going$"),
    "thanks": re.compile(r"^(?:(?:ok(?:ay)?|great|perfect|cool|awesome)[, ]+)?(?:thanks|thank you|cheers)\b"),
    "bye": re.compile(r"^(?:bye|goodbye|good bye|see you|good night)\b"),
    "where": re.compile(r"^where\b|\bwhere (?:is|are|can i (?:find|see))\b|\bwhich (?:room|gallery|floor)\b"),
}

GREETING = r"(?:hi|hello|hey|hiya|howdy|greetings|good (?:morning|afternoon|evening))"
