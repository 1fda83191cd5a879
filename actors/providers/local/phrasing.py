"""Spoken forms for the offline dialogue engine: numbers Whisper wrote in
words, results read aloud, and the user's own words turned round ("my" →
"your"). Pure functions with no state, shared by the engine's rules
(dialogue.py) and its answers from the prompt's notes (prompt_notes.py).
"""

from __future__ import annotations

import re

# ------------------------------------------------------------ number words
_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}


def _is_sep(part: str | None) -> bool:
    return part is not None and re.fullmatch(r"[ \t-]+", part) is not None


def _below_100(parts: list[str], k: int) -> tuple[int, int] | None:
    """Parse 'seven', 'twelve', 'forty two' or 'forty-two' at parts[k]."""
    if k >= len(parts):
        return None
    word = parts[k]
    if word in _SMALL:
        return _SMALL[word], k + 1
    if word in _TENS:
        if k + 2 < len(parts) and _is_sep(parts[k + 1]) and 1 <= _SMALL.get(parts[k + 2], 0) <= 9:
            return _TENS[word] + _SMALL[parts[k + 2]], k + 3
        return _TENS[word], k + 1
    return None


def _number_at(parts: list[str], i: int) -> tuple[int, int] | None:
    """Parse a number 0..999 spelled in words starting at parts[i]; returns
    (value, index after it)."""
    if parts[i] == "a" and i + 2 < len(parts) and _is_sep(parts[i + 1]) and parts[i + 2] == "hundred":
        small, j = 1, i + 2
    else:
        parsed = _below_100(parts, i)
        if parsed is None:
            return None
        small, j = parsed
        if not (j + 1 < len(parts) and _is_sep(parts[j]) and parts[j + 1] == "hundred" and 1 <= small <= 9):
            return small, j
        j += 1
    value, j = small * 100, j + 1  # j now after "hundred"
    k = j
    if k + 1 < len(parts) and _is_sep(parts[k]) and parts[k + 1] == "and":
        k += 2
    if k + 1 < len(parts) and _is_sep(parts[k]):
        rest = _below_100(parts, k + 1)
        if rest is not None:
            return value + rest[0], rest[1]
    return value, j


def words_to_digits(text: str) -> str:
    """'what's twelve times seven' → "what's 12 times 7" (0..999), because
    Whisper writes small numbers either way."""
    parts = re.findall(r"[a-z]+|[^a-z]+", text)
    out: list[str] = []
    i = 0
    while i < len(parts):
        parsed = _number_at(parts, i) if parts[i].isalpha() else None
        if parsed is None:
            out.append(parts[i])
            i += 1
        else:
            out.append(str(parsed[0]))
            i = parsed[1]
    return "".join(out)


# ------------------------------------------------------------- formatting
def format_number(value: float) -> str:
    """Digits a TTS voice reads well; 'about' marks a rounded value."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value)) if value >= 0 else f"minus {int(-value)}"
    text = f"{abs(value):.6g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa} times 10 to the power of {int(exp)}"
    about = "about " if float(f"{abs(value):.6g}") != abs(value) else ""
    return f"{about}{'minus ' if value < 0 else ''}{text}"


_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by", "%": "modulo", "**": "to the power of"}


def speak_expression(expression: str) -> str | None:
    """'12 * 7' → '12 times 7'; None for anything with parentheses, where a
    flat reading would misstate the grouping."""
    tokens = re.findall(r"\*\*|\d+(?:\.\d+)?|[-+*/%()]|\S", expression)
    if any(t in "()" for t in tokens) or not tokens:
        return None
    words: list[str] = []
    prev_is_operand = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "**" and i + 1 < len(tokens) and tokens[i + 1] in ("2", "3"):
            words.append("squared" if tokens[i + 1] == "2" else "cubed")
            i += 2
            prev_is_operand = True
            continue
        if tok in _OP_WORDS:
            if not prev_is_operand and tok != "-":
                return None  # "* 3" has no reading; only a sign may lead
            words.append(_OP_WORDS[tok])
            prev_is_operand = False
        elif re.fullmatch(r"\d+(?:\.\d+)?", tok):
            words.append(tok)
            prev_is_operand = True
        else:
            return None
        i += 1
    return " ".join(words)


def format_duration(seconds: float) -> str:
    total = int(round(seconds))
    parts = []
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        n, total = divmod(total, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return join_words(parts) if parts else "0 seconds"


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def as_sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


_PRONOUNS = {
    "i": "you", "i'm": "you're", "im": "you're", "me": "you", "my": "your", "mine": "yours",
    "myself": "yourself", "am": "are", "i've": "you've", "i'll": "you'll", "i'd": "you'd",
}


def second_person(text: str) -> str:
    """'I parked on level 3' → 'you parked on level 3', for read-back."""
    text = re.sub(r"\bI was\b", "you were", text, flags=re.IGNORECASE)
    return re.sub(
        r"\b[A-Za-z']+\b",
        lambda m: _PRONOUNS.get(m.group().lower(), m.group()),
        text,
    )
