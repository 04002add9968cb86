"""Counterfactual text: swap one protected attribute value for another and change nothing else.

``swap_value`` replaces whole-word occurrences of a value (case-insensitive, keeping the
capitalization of each occurrence, never inside a longer word or hyphenated compound, so
"Male" is not found in "Female" and "Asian" not in "Asian-Pac-Islander"), and fixes the
indefinite article in front of it ("an Asian man" -> "a Hispanic man"). For sex/gender the
text is taken to describe one person, so every word gendered like the old value takes the new
gender (she -> he, her -> his/him, Wife -> Husband, ...); words of the new gender stay.
``swap_terms`` exchanges two terms simultaneously (BBQ's two people).
"""

from __future__ import annotations

import re

_WORD = r"(?<![\w-]){}(?![\w-])"

# male -> female; the reverse map is derived. "her" is ambiguous (his / him) and handled apart.
_GENDER = {"he": "she", "him": "her", "his": "her", "himself": "herself", "man": "woman", "men": "women",
           "male": "female", "males": "females", "husband": "wife", "husbands": "wives", "boy": "girl",
           "boys": "girls", "father": "mother", "fathers": "mothers", "son": "daughter", "sons": "daughters",
           "brother": "sister", "brothers": "sisters", "gentleman": "lady", "gentlemen": "ladies", "mr": "mrs",
           "uncle": "aunt", "nephew": "niece", "king": "queen", "boyfriend": "girlfriend", "grandfather":
           "grandmother", "grandson": "granddaughter"}
_TO_MALE = {v: k for k, v in _GENDER.items() if v != "her"} | {"hers": "his", "ms": "mr"}
_TO_FEMALE = dict(_GENDER)
# words after "her" that show it is an object pronoun (-> "him"), not a possessive (-> "his")
_OBJECT_FOLLOWERS = {"", "the", "a", "an", "to", "and", "or", "but", "that", "this", "with", "for", "in", "on",
                     "at", "from", "about", "as", "if", "when", "because", "so", "than", "up", "out", "down",
                     "off", "back", "again", "too", "very", "is", "was", "be"}
GENDER_ATTRIBUTES = ("sex", "gender")
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
_YOU_SOUND = ("uni", "use", "usu", "eu", "one", "once", "ur")


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if template.islower() else word


def _article(next_word: str) -> str:
    w = next_word.lower()
    if w.startswith(_SILENT_H):
        return "an"
    if w.startswith(_YOU_SOUND):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _fix_articles(text: str, spans: list[tuple[int, int]]) -> str:
    """Make 'a'/'an' agree with the word that starts at each span (spans are in ``text``)."""
    out, last = [], 0
    for start, _ in spans:
        m = re.search(r"(?<![\w-])(a|an|A|An|AN)(\s+)$", text[last:start])
        if m:
            a0 = last + m.start(1)
            art = _article(text[start:start + 12])
            out.append(text[last:a0] + _match_case(m.group(1), art) + m.group(2))
            last = start
    out.append(text[last:])
    return "".join(out)


def _sub_tracked(pattern: re.Pattern, repl, text: str) -> tuple[str, list[tuple[int, int]]]:
    """``re.sub`` that also returns the spans of the replacements in the new text."""
    out, spans, pos, shift = [], [], 0, 0
    for m in pattern.finditer(text):
        new = repl(m)
        out.append(text[pos:m.start()])
        start = m.start() + shift
        spans.append((start, start + len(new)))
        out.append(new)
        shift += len(new) - (m.end() - m.start())
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


def swap_value(text: str, src: str, dst: str, *, attribute: str | None = None) -> str:
    """``text`` with every whole-word ``src`` replaced by ``dst`` (see the module docstring)."""
    if src == dst:
        return text
    pattern = re.compile(_WORD.format(re.escape(src)), re.IGNORECASE)
    text, spans = _sub_tracked(pattern, lambda m: _match_case(m.group(0), dst), text)
    text = _fix_articles(text, spans)
    if attribute in GENDER_ATTRIBUTES:
        to = _gender_direction(dst)
        if to is not None:
            text = _swap_gender_words(text, to, skip={src.lower(), dst.lower()})
    return text


def _gender_direction(value: str) -> str | None:
    v = value.lower()
    if v in ("male", "man", "men", "m", "boy"):
        return "male"
    if v in ("female", "woman", "women", "f", "girl"):
        return "female"
    return None


def _swap_gender_words(text: str, to: str, skip: set[str]) -> str:
    table = _TO_MALE if to == "male" else _TO_FEMALE
    words = [w for w in table if w not in skip] + (["her"] if to == "male" else [])
    pattern = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True))
                         + r")(?![\w-])", re.IGNORECASE)

    def repl(m: re.Match) -> str:
        w = m.group(0).lower()
        if w == "her":  # possessive before a noun phrase, object pronoun otherwise
            nxt = re.match(r"\s*([A-Za-z']*)", text[m.end():]).group(1).lower()
            return _match_case(m.group(0), "him" if nxt in _OBJECT_FOLLOWERS else "his")
        return _match_case(m.group(0), table[w])
    return pattern.sub(repl, text)


def swap_terms(text: str, a: str, b: str) -> str:
    """Exchange every whole-word ``a`` and ``b`` at once (case kept, articles fixed)."""
    pattern = re.compile(r"(?<![\w-])(" + re.escape(a) + "|" + re.escape(b) + r")(?![\w-])", re.IGNORECASE)
    text, spans = _sub_tracked(pattern, lambda m: _match_case(m.group(0), b if m.group(0).lower() == a.lower() else a),
                               text)
    return _fix_articles(text, spans)


def contains_value(text: str, value: str) -> bool:
    return re.search(_WORD.format(re.escape(value)), text, re.IGNORECASE) is not None
