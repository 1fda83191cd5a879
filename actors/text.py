"""Sentence splitting for speech: TTS speaks a reply sentence by sentence,
so the first sentence must be cut off the LLM stream as soon as it ends."""

from __future__ import annotations

import re

_CJK_END = "。！？；…"
_LATIN_END = ".!?;"
# Latin punctuation ends a sentence only before whitespace ("3.5" and "e.g."
# inside a word do not); CJK punctuation ends one wherever it stands. Closing
# quotes, brackets and markdown emphasis marks stay with their sentence.
_BOUNDARY = re.compile(rf"([{_CJK_END}]+[”’\"')）*_~]*)|([{_LATIN_END}]+[\"')\]*_~]*)(?=\s)")


_CLAUSE = re.compile(r"(?:[,，、：—]|:(?!//))\s*")
"""A clause boundary; the colon of a URL (`https://`) is none."""


_PHRASE_START = re.compile(r"\s(?=(?:with|and|but|or|in|on|at|by|for|from|that|which|who|where|when|while|"
                           r"because|after|before|since|until)\s)", re.IGNORECASE)
"""A space before a word that starts a phrase: where a clause-less first sentence may be cut."""


class SentenceSplitter:
    """`first_soft_limit`: the first piece of a reply is cut at a clause
    boundary (comma, colon, dash) once it is this long, because the listener
    waits for the first piece and a long sentence takes long to synthesise.
    `first_hard_limit`: a first piece with no clause boundary by this length
    is cut before the last phrase-starting word ("with", "and", "in", …) in
    it: "The Rosetta Stone is a granite-like slab carved in 196 BC | with a
    priestly decree honouring King Ptolemy the Fifth," (piper: ~380 ms of
    synthesis before the first audio for the whole, ~190 ms for the part)."""

    def __init__(self, min_chars: int = 2, first_soft_limit: int = 60, first_hard_limit: int = 100) -> None:
        self._buf = ""
        self._min_chars = min_chars
        self._first_soft_limit = first_soft_limit
        self._first_hard_limit = first_hard_limit
        self._emitted = False

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the pieces ready to be spoken."""
        self._buf += text
        out: list[str] = []
        while (piece := self._next_piece()) is not None:
            out.append(piece)
            self._emitted = True
        return out

    def _next_piece(self) -> str | None:
        end = next((m.end() for m in _BOUNDARY.finditer(self._buf)
                    if len(self._buf[:m.end()].strip()) >= self._min_chars), None)
        if not self._emitted:
            region = self._buf if end is None else self._buf[:end]
            if len(region) >= self._first_soft_limit:
                cut = next((m.end() for m in _CLAUSE.finditer(region)
                            if m.start() >= self._first_soft_limit // 2), None)
                if (cut is None or cut > self._first_hard_limit) and len(region) > self._first_hard_limit:
                    phrase = max((m.start() for m in _PHRASE_START.finditer(region[:self._first_hard_limit])
                                  if m.start() >= self._first_soft_limit // 2), default=None)
                    cut = phrase if phrase is not None else cut
                if cut is not None and (end is None or cut < end):
                    end = cut
        if end is None:
            return None
        piece, self._buf = self._buf[:end].strip(), self._buf[end:]
        return piece

    def flush(self) -> list[str]:
        """End of the reply: whatever is left is the last sentence."""
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []


def split_sentences(text: str) -> list[str]:
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()


_FINISHED = re.compile(r"(?<![.…])[.!?。！？][\"')\]”’）]*$")


def ends_a_sentence(words: str) -> bool:
    """Whether a transcript ends as a finished sentence would: a full stop,
    question or exclamation mark, not a trailing ellipsis ("I think...")."""
    return bool(_FINISHED.search(words.strip()))


# ---------------------------------------------------------------- emotion
# The words a reply's emotion may take: xiaozhi devices' face set, which the
# native protocol passes on as is. Synonyms fold onto them so `[smile]` works.
EMOTIONS = frozenset({
    "neutral", "happy", "laughing", "funny", "sad", "angry", "crying", "loving", "embarrassed", "surprised",
    "shocked", "thinking", "winking", "cool", "relaxed", "delicious", "kissy", "confident", "sleepy", "silly",
    "confused",
})
_EMOTION_SYNONYMS = {
    "smile": "happy", "smiling": "happy", "joy": "happy", "glad": "happy", "excited": "happy", "cheerful": "happy",
    "laugh": "laughing", "laughs": "laughing", "chuckles": "laughing", "giggles": "laughing",
    "sadness": "sad", "cry": "crying", "cries": "crying", "love": "loving", "surprise": "surprised",
    "think": "thinking", "wink": "winking", "calm": "relaxed", "sleep": "sleepy", "shock": "shocked",
}
_EMOJI_EMOTION = {
    "😶": "neutral", "😐": "neutral", "🙂": "happy", "😊": "happy", "😀": "happy", "😃": "happy", "😄": "happy",
    "😁": "happy", "👍": "happy", "🎉": "happy", "😆": "laughing", "😂": "funny", "🤣": "funny", "😔": "sad",
    "😢": "sad", "😞": "sad", "🙁": "sad", "☹": "sad", "😠": "angry", "😡": "angry", "😭": "crying", "😍": "loving",
    "🥰": "loving", "❤": "loving", "😳": "embarrassed", "😯": "surprised", "😮": "surprised", "😲": "surprised",
    "😱": "shocked", "🤔": "thinking", "😉": "winking", "😎": "cool", "😌": "relaxed", "😋": "delicious",
    "😘": "kissy", "😏": "confident", "😴": "sleepy", "🤪": "silly", "🙄": "confused", "😕": "confused",
}
_TAG = re.compile(
    r"(?:\[\s*(?:emotion\s*[:=]\s*)?([A-Za-z]{2,16})\s*\]"
    r"|\(\s*(?:emotion\s*[:=]\s*)?([A-Za-z]{2,16})\s*\)"
    r"|<\s*emotion\s*[:=]\s*([A-Za-z]{2,16})\s*/?>)[ \t]*")
_TAG_PREFIX = re.compile(r"[\[(<]\s*(?:e(?:m(?:o(?:t(?:i(?:o(?:n\s*[:=]?\s*)?)?)?)?)?)?)?[A-Za-z]{0,16}\s*/?$")
"""What the end of a chunk looks like when a tag may be cut in two: held back."""
MAX_TAG_CHARS = 40


def emotion_word(word: str) -> str | None:
    """The emotion a tag's word names, or None for an ordinary word in brackets."""
    w = word.lower()
    return w if w in EMOTIONS else _EMOTION_SYNONYMS.get(w)


def emoji_emotion(text: str) -> str | None:
    """The emotion of the first emoji in `text` that names one."""
    for ch in text:
        if ch in _EMOJI_EMOTION:
            return _EMOJI_EMOTION[ch]
    return None


def _tags_out(text: str) -> tuple[str, str | None]:
    first: list[str] = []

    def drop(m: re.Match[str]) -> str:
        emotion = emotion_word(m.group(1) or m.group(2) or m.group(3))
        if emotion is None:
            return m.group(0)  # "(see below)", "[1]": not a tag
        first.append(emotion)
        return ""

    return _TAG.sub(drop, text), (first[0] if first else None)


def strip_emotion_tags(text: str) -> str:
    """Whole text without its emotion tags (`[happy]`, `(laughing)`, `<emotion:sad>`)."""
    return _tags_out(text)[0]


class EmotionFilter:
    """Finds the reply's emotion in the LLM's text stream and takes its tags
    out, for a model (OpenAI-compatible) that can only say it in words.

    `feed` returns the text without tags and the turn's emotion the first
    time one shows (a tag, else the first emoji that names one); never again
    after. A tag cut across two chunks is held back until it completes (at
    most MAX_TAG_CHARS), so the listener never hears "[hap".
    """

    def __init__(self) -> None:
        self._held = ""
        self.emotion: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        text = self._held + text
        self._held = ""
        cut = max(text.rfind("["), text.rfind("("), text.rfind("<"))
        if cut >= 0 and len(text) - cut <= MAX_TAG_CHARS and _TAG_PREFIX.fullmatch(text[cut:]):
            text, self._held = text[:cut], text[cut:]
        return self._take(text)

    def flush(self) -> tuple[str, str | None]:
        text, self._held = self._held, ""
        return self._take(text)

    def _take(self, text: str) -> tuple[str, str | None]:
        clean, tag = _tags_out(text)
        if self.emotion is not None:
            return clean, None
        self.emotion = tag or emoji_emotion(clean)
        return clean, self.emotion


# ---------------------------------------------------------------- speakable text
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\u2300-\u23FF"
    "\uFE0E\uFE0F\u200D\u20E3\U000E0020-\U000E007F]")
_IMAGE = re.compile(r"!\[([^\]\n]{0,200})\]\([^)\s]{0,2000}(?:\s+\"[^\"\n]{0,200}\")?\)")
_LINK = re.compile(r"\[([^\]\n]{1,200})\]\([^)\s]{0,2000}(?:\s+\"[^\"\n]{0,200}\")?\)")
_REF_LINK = re.compile(r"\[([^\]\n]{1,200})\]\[[^\]\n]{0,100}\]")
_URL = re.compile(r"<?(?:https?://|ftp://|www\.)[^\s<>]{1,2000}>?", re.IGNORECASE)
_INLINE_CODE = re.compile(r"`{1,3}([^`\n]{0,500})`{1,3}")
_HTML_TAG = re.compile(r"</?(?:br|p|div|span|b|i|u|s|em|strong|code|pre|sub|sup|a|img|ul|ol|li|h[1-6]|table|"
                       r"thead|tbody|tr|td|th|hr|blockquote)(?:\s[^<>\n]{0,200})?\s*/?>", re.IGNORECASE)
"""Common HTML a model may emit; `x<y and y>z` is not a tag."""
_EMPHASIS = re.compile(r"(?<!\s)\*+|\*+(?!\s)|~~|(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")
"""Emphasis marks: a `*` with blanks on both sides is arithmetic and stays; `my_var` keeps its `_`."""
_CJK_GAP = re.compile(r"(?<=[\u3000-\u303f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef])\s+"
                      r"(?=[\u3000-\u303f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:，。！？；：、…])")
_LEADING_PUNCT = re.compile(r"^[\s,;:，；：、.。)\]）]+")
MAX_INLINE_CODE_CHARS = 40
"""Inline code this short is said (`pip install`); longer is dropped."""


def _inline_code(m: re.Match[str]) -> str:
    code = m.group(1).strip()
    return code if len(code) <= MAX_INLINE_CODE_CHARS else ""


def speakable(text: str) -> str:
    """What a voice should say of `text`: markdown (emphasis, headings,
    bullets, tables, links → their words), code blocks, inline code over
    MAX_INLINE_CODE_CHARS, URLs, emoji and emotion tags taken out; CJK and
    punctuation kept. Idempotent, so a sentence cleaned upstream is unharmed.
    A sentence that only cites its source ("Source: museum.yaml › Rosetta
    Stone.") is for the eye: read aloud, a file name is noise."""
    if _CITATION.match(text):
        return ""
    if "\n" in text or _LINE_MARKER.match(text):
        lines = MarkdownLines()
        text = lines.feed(text + "\n") + lines.flush()
    text = strip_emotion_tags(text)
    text = _IMAGE.sub(lambda m: m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _REF_LINK.sub(lambda m: m.group(1), text)
    text = _URL.sub("", text)
    text = _INLINE_CODE.sub(_inline_code, text)
    text = _HTML_TAG.sub(" ", text)
    text = _EMPHASIS.sub("", text)
    text = _EMOJI.sub("", text).replace("`", "")
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", _CJK_GAP.sub("", text))
    return _LEADING_PUNCT.sub("", text).strip()


def has_words(text: str) -> bool:
    """Anything a voice can say (letters, digits, CJK), not just punctuation."""
    return any(ch.isalnum() for ch in text)


_CITATION = re.compile(r"\s*(?:\[\d+\]\s*)?(?:sources?|来源|出处)\s*[:：]", re.IGNORECASE)
"""A sentence that cites where an answer came from (as the prompt's numbered excerpts invite)."""
_LINE_MARKER = re.compile(r"[ \t]{0,3}(?:#{1,6}[ \t]|[-*+][ \t]|\d{1,3}[.)][ \t]|>|\||```|~~~)")
_LINE_UNDECIDED = re.compile(r"[ \t]{0,3}(?:#{0,6}|[-*+]|\d{0,3}[.)]?|`{1,2}|~{1,2}|[-*_][-*_ \t]*)")
"""A line start that may still become a marker: wait for more text."""
_HEADING = re.compile(r"[ \t]{0,3}#{1,6}[ \t]+")
_BULLET = re.compile(r"[ \t]{0,3}(?:[-*+]|\d{1,3}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?")
_QUOTE = re.compile(r"[ \t]{0,3}(?:>[ \t]?)+")
_FENCE = re.compile(r"[ \t]{0,3}(```|~~~)")
_RULE = re.compile(r"[ \t]{0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*")
_TABLE_SEPARATOR = re.compile(r"[ \t|:\-]+")
_SENTENCE_END = set(_CJK_END + _LATIN_END + ":：,，、")
MAX_UNDECIDED = 64
"""A line start that still looks like a marker this long ("- - - - …") is decided anyway."""
MAX_HELD_LINE = 2000
"""A table row or rule is held until its line ends; past this it is spoken as text."""


def _is_cjk(ch: str) -> bool:
    return "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af"


class MarkdownLines:
    """The streaming, line-aware half of `speakable`: code fences dropped,
    heading / bullet / quote markers cut, table rows read as comma-separated
    cells, rules dropped; a structural line or paragraph that ends without
    punctuation gets a full stop, so it becomes its own sentence for the
    splitter. Text is passed on as soon as its line's kind is known; only a
    line start that may still be a marker (a few characters) or a table row
    (up to MAX_HELD_LINE) is held back."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_fence = False
        self._state = "start"
        """start (kind not known yet), text, structural (a heading or an item), drop, hold."""
        self._last = ""
        """The last character passed on that was not a blank."""

    def feed(self, text: str) -> str:
        self._buf += text
        out: list[str] = []
        while (nl := self._buf.find("\n")) >= 0:
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            out.append(self._track(self._end_line(line)))
        out.append(self._track(self._partial()))
        return "".join(out)

    def flush(self) -> str:
        out = self._track(self._end_line(self._buf)) if self._buf or self._state != "start" else ""
        self._buf = ""
        return out

    def _track(self, out: str) -> str:
        stripped = out.rstrip()
        if stripped:
            self._last = stripped[-1]
        return out

    def _decide(self, line: str, whole: bool) -> str | None:
        """The line's kind from its start, or None to wait for more."""
        settled = whole or len(line) > MAX_UNDECIDED
        if self._in_fence:
            if _FENCE.match(line):
                return "fence"
            return "drop" if settled or len(line.lstrip()) >= 3 else None
        if _FENCE.match(line):
            return "fence"
        if line.lstrip().startswith("|") or (whole and _RULE.fullmatch(line)):
            return "hold" if not whole else "table"
        if not settled and _LINE_UNDECIDED.fullmatch(line):
            return None
        if _HEADING.match(line) or _BULLET.match(line):
            return "structural"
        return "text"

    def _strip_marker(self, line: str) -> str:
        for marker in (_HEADING, _BULLET, _QUOTE):
            if m := marker.match(line):
                return line[m.end():]
        return line

    def _partial(self) -> str:
        if self._state == "start":
            kind = self._decide(self._buf, whole=False)
            if kind is None:
                return ""
            self._state = kind
            if kind in ("text", "structural"):
                self._buf = self._strip_marker(self._buf)
        if self._state in ("text", "structural"):
            out, self._buf = self._buf, ""
            return out
        if self._state == "hold":
            if len(self._buf) > MAX_HELD_LINE:  # not a table row after all: say it
                self._state = "text"
                out, self._buf = self._buf, ""
                return out
            return ""
        self._buf = ""  # a fence line or code inside one: never said
        return ""

    def _end_line(self, rest: str) -> str:
        """The line is complete: `rest` is what of it was not passed on yet."""
        state, self._state = self._state, "start"
        # a paragraph break: a line still undecided at its end and empty (one
        # passed on while it streamed had words)
        blank = state == "start" and not rest.strip()
        if state == "start":
            state = self._decide(rest, whole=True) or "text"
            if state in ("text", "structural"):
                rest = self._strip_marker(rest)
        if state == "fence":
            self._in_fence = not self._in_fence
            return ""
        if state == "drop" or self._in_fence:
            return ""
        if state in ("hold", "table"):
            if _RULE.fullmatch(rest) or _TABLE_SEPARATOR.fullmatch(rest) or not rest.strip():
                return ""
            cells = [c.strip() for c in rest.strip().strip("|").split("|") if c.strip()]
            rest, state = ", ".join(cells), "structural"
        if blank:
            return self._stop()  # a blank line ends a paragraph
        text = rest.rstrip()
        if state == "structural":
            return text + self._stop(text)
        return text + " " if text else " "

    def _stop(self, text: str = "") -> str:
        last = text.rstrip(" \t*_~`")[-1:] or self._last  # "*closed*" ends in a word
        if not last or last in _SENTENCE_END or not has_words(last):
            return " "
        return "。" if _is_cjk(last) else ". "
