"""Refusals and deflections found in a caption's own text (docs/protocol.md §19.2).

A model that declines does not always say so in ``finish_reason``: it often answers
``stop`` with "I'm sorry, but I can't help with that." as the caption. This finds such
answers sentence by sentence, in the languages vision models answer in most, without
flagging a real description that happens to use the words ("I'm sorry to see the broken
vase", a sign that reads "sorry, we cannot help you").

The rule: the text is cut into sentences and each sentence into clauses (at "but",
"however" and their equivalents). A clause *declines* when it says the model cannot or
will not do the task (first person + inability + a verb of the task), speaks as an AI,
says there is no image, or declines outright. An apology clause ("I'm sorry,") declines
only when a declining clause or a "but" follows it. The caption is a refusal when a
declining clause is in its first two sentences and the clauses that do not decline hold
fewer than ``DESCRIPTION_WORDS`` words: a partial refusal followed by a real description
("I can't identify the person, but the photo shows a man in a blue suit on a stage
in front of a flag") is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DESCRIPTION_WORDS", "Refusal", "find_refusal", "word_count"]

# Words of description that make an answer a caption although one clause declines.
DESCRIPTION_WORDS = 12
# Words a declining phrase may come after in its clause ("Unfortunately, as an AI, I ...").
_LEAD_WORDS = 3
# A clause opening with one of these describes something (titles, signs, quotes unquoted).
_ARTICLES = frozenset({"a", "an", "the", "ein", "eine", "der", "die", "das", "un", "une",
                       "le", "la", "les", "el", "los", "las", "il", "gli", "het"})

_I = re.IGNORECASE | re.UNICODE
# Stems: "describe", "describing", "identify", "identifying", ... all count.
_TASK_EN = (r"(?:help|assist|comply|fulfil|process|provid|describ|caption|identif|"
            r"analy[sz]|view|see|access|open|interpret|recogni[sz]|do that|answer|"
            r"complet|generat|creat|writ|support|discuss|engag)\w*")
# Clauses that decline, per language. Each is searched in one clause (quotes removed).
_DECLINE = [re.compile(p, _I) for p in (
    # English
    rf"\bi\s*(?:can\s*not|can'?t|cannot|could\s*n[o']t|am\s+(?:not\s+)?(?:un)?able\s+to|"
    rf"'m\s+(?:not\s+)?(?:un)?able\s+to|won'?t|will\s+not|must\s+not|do\s*n[o']t\s+have"
    rf"\s+the\s+ability\s+to|am\s+not\s+(?:allowed|permitted)\s+to)\b[^.!?]{{0,40}}?\b"
    rf"{_TASK_EN}\b",
    r"\bi\s+(?:must|have\s+to|need\s+to|'ll\s+have\s+to)\s+(?:respectfully\s+)?decline\b",
    r"\bi(?:'m|\s+am)\s+not\s+(?:comfortable|going\s+to)\b",
    r"\bi\s+(?:do\s*n[o']t|do\s+not)\s+feel\s+comfortable\b",
    rf"\bi(?:'d|\s+would)\s+(?:rather|prefer)\s+not\s+(?:to\s+)?{_TASK_EN}\b",
    # "As an AI-generated image, ..." describes the image, it is no AI speaking.
    r"\bas\s+an?\s+(?:ai|artificial\s+intelligence|(?:large\s+)?language\s+model|"
    r"ai\s+(?:language\s+model|assistant|model))\b"
    r"(?!-(?:generated|created|made|rendered|produced|edited|enhanced|designed|styled?|art)\b)",
    r"\b(?:no|there\s+is\s+no|there'?s\s+no|i\s+(?:do\s*n[o']t|can\s*n[o']t|cannot)\s+see\s+"
    r"(?:an?|any)?)\s*(?:image|picture|photo)\s+(?:was\s+|has\s+been\s+|is\s+)?"
    r"(?:provided|attached|uploaded|included|shared|here|in\s+(?:your|the|this)\s+"
    r"(?:message|request))\b",
    r"\b(?:the|your)\s+image\s+(?:did\s*n[o']t|did\s+not|failed\s+to)\s+(?:load|come\s+"
    r"through|upload)\b",
    r"\bi\s+(?:can\s*not|can'?t|cannot|am\s+unable\s+to)\s+(?:view|see|open|access)\s+"
    r"(?:images|pictures|photos|attachments)\b",
    # German
    # "ich kann" and, after an adverb or object, "kann ich" ("Leider kann ich ...").
    r"\b(?:ich\s+(?:kann|darf|werde|bin)|(?:kann|darf|werde|bin)\s+ich)\b[^.!?]{0,40}?"
    r"\b(?:nicht|keine[nmrs]?)\b[^.!?]{0,40}?"
    r"\b(?:helfen|beschreiben|identifizieren|erkennen|sehen|analysieren|bearbeiten|"
    r"erfüllen|unterstützen|liefern|geben|erstellen|anbieten|bereitstellen|nennen|"
    r"in\s+der\s+lage)\b",
    r"\bals\s+(?:eine?\s+)?(?:ki|künstliche\s+intelligenz|sprachmodell)\b"
    r"(?!-(?:generiert|erzeugt|erstellt)\w*)",
    # French
    r"\bje\s+ne\s+(?:peux|suis\s+pas\s+en\s+mesure\s+de|vais\s+pas|saurais|pourrai)\b"
    r"[^.!?]{0,40}?\b(?:aider|décrire|identifier|reconnaître|voir|analyser|traiter|"
    r"répondre|fournir)\b",
    r"\ben\s+tant\s+qu[e']\s*(?:ia|intelligence\s+artificielle|modèle\s+de\s+langage|"
    r"assistant)\b",
    # Spanish
    r"\bno\s+(?:puedo|soy\s+capaz\s+de|me\s+es\s+posible)\b[^.!?]{0,40}?\b(?:ayudar|"
    r"describir|identificar|reconocer|ver|analizar|procesar|proporcionar)"
    r"(?:me|te|se|nos|os|l[aoe]s?)?\b",
    r"\bcomo\s+(?:una?\s+)?(?:ia|inteligencia\s+artificial|modelo\s+de\s+lenguaje)\b",
    # Italian
    r"\bnon\s+(?:posso|sono\s+in\s+grado\s+di|riesco\s+a)\b[^.!?]{0,40}?\b(?:aiutar|"
    r"descriver|identificar|riconoscer|veder|analizzar|fornir)(?:e|mi|ti|ci|vi|l[aoie]|gli)\b",
    r"\bin\s+quanto\s+(?:ia|intelligenza\s+artificiale|modello\s+linguistico)\b",
    # Portuguese
    r"\bn[ãa]o\s+(?:posso|consigo|sou\s+capaz\s+de)\b[^.!?]{0,40}?\b(?:ajud(?:ar|á)|"
    r"descrev(?:er|ê)|identific(?:ar|á)|reconhec(?:er|ê)|ver|vê|analis(?:ar|á)|"
    r"fornec(?:er|ê))\b",
    # Dutch
    r"\bik\s+kan\b[^.!?]{0,30}?\b(?:niet|geen)\b[^.!?]{0,30}?\b(?:helpen|beschrijven|"
    r"identificeren|herkennen|zien)\b",
    # Russian
    r"\bя\s+не\s+(?:могу|в\s+состоянии|буду)\b[^.!?]{0,40}?(?:помочь|описать|опознать|"
    r"распознать|идентифицировать|увидеть|предоставить)",
    r"\bкак\s+(?:ии|искусственный\s+интеллект|языковая\s+модель)\b",
    # Chinese, Japanese, Korean (no word boundaries)
    r"我(?:无法|不能|没办法|不可以|不便)[^。！？]{0,12}?(?:帮助|描述|识别|协助|提供|处理|查看|看到|辨认)",
    r"作为(?:一个)?(?:AI|人工智能|语言模型)",
    r"(?:説明|識別|特定|お手伝い|対応|認識)(?:すること)?(?:は|が)?できません",
    r"(?:도와드릴|설명할|식별할|확인할)\s*수\s*없",
)]
# An apology that opens a refusal ("I'm sorry," "Leider"); alone it declines nothing.
_APOLOGY = re.compile(
    r"^\W*(?:i(?:'m|\s+am)\s+(?:so\s+|very\s+|really\s+|truly\s+)?sorry|sorry|"
    r"(?:my\s+)?apologies|i\s+apologi[sz]e|unfortunately|es\s+tut\s+mir\s+leid|leider|"
    r"entschuldigung|je\s+suis\s+(?:vraiment\s+)?désolée?|désolée?|malheureusement|"
    r"lo\s+siento|lamentablemente|disculpa|mi\s+dispiace|purtroppo|desculpe|lamento|"
    r"infelizmente|het\s+spijt\s+me|helaas|извините|простите|к\s+сожалению|抱歉|对不起|"
    r"很遗憾|申し訳(?:ありません|ございません)|すみません|죄송합니다)\W*", _I)
_BUT = re.compile(r"(?:,|;|\s)\s*(?:but|however|although|though|aber|jedoch|mais|"
                  r"cependant|pero|sin\s+embargo|ma|però|mas|porém|maar|но|однако)\b\s*|"
                  r"(?:但是|但|不过|しかし|が、|하지만)", _I)
_BUT_FIRST = re.compile(r"(?:but|however|aber|jedoch|mais|pero|ma|mas|maar|но|однако)\b|"
                        r"(?:但是|但|不过)", _I)
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+|\n+|(?<=[。！？])")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|„[^“”]*[“”]|«[^»]*»|「[^」]*」|'[^']{3,}'(?=\W|$)")
# Right/left single quotes, modifier-letter and fullwidth apostrophes, prime: all "'".
_APOSTROPHES = str.maketrans(dict.fromkeys("\u2019\u2018\u02bc\uff07\u2032", "'"))
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


# Words and stems every declining or apologising pattern above needs: a caption with
# none of them is no refusal, decided by substring tests (most captions never reach the
# sentence rules; a regex alternation would cost as much as the rules).
_HINT_WORDS = frozenset({"i", "ich", "je", "no", "non", "não", "nao", "ik", "я", "как",
                         "als", "como"})
_HINT_STEMS = ("sorry", "apolog", "unfortunately", "leid", "entschuldig", "désolé",
               "malheureusement", "siento", "lamentablemente", "disculp", "dispiace",
               "purtroppo", "desculp", "lamento", "infelizmente", "spijt", "helaas", "извин",
               "прост", "сожален", "抱歉", "对不起", "遗憾", "我", "作为", "申し訳", "すみません",
               "できません", "죄송", "수 없", "수없", "en tant", "in quanto", "as a", "image did",
               "image failed")
_LETTERS = re.compile(r"[^\W\d_]+")


def _hinted(text: str) -> bool:
    low = text.casefold()
    return any(stem in low for stem in _HINT_STEMS) or \
        not _HINT_WORDS.isdisjoint(_LETTERS.findall(low))


@dataclass(frozen=True)
class Refusal:
    """Why the text reads as a refusal: the declining clause, as written."""

    clause: str


def word_count(text: str) -> int:
    """Words, counting each CJK character as one (those scripts have no spaces)."""
    cjk = sum(1 for _ in _CJK.finditer(text))
    if cjk:
        text = _CJK.sub(" ", text)
    return cjk + sum(1 for _ in _WORD.finditer(text))


def find_refusal(text: str) -> Refusal | None:
    """The refusal ``text`` is, or None when it is (or holds enough of) a caption."""
    # Models write "I’m" and "can’t" with typographic apostrophes as often as with "'":
    # the patterns see one kind.
    text = text.translate(_APOSTROPHES)
    if not _hinted(text):
        return None
    sentences = [s for s in _SENTENCE.split(_QUOTED.sub(" ", text).strip()) if s.strip()]
    declined: str | None = None
    described = 0
    for index, sentence in enumerate(sentences):
        for clause, declines in _clauses(sentence):
            if declines and index < 2 and declined is None:
                declined = clause.strip()
            elif not declines:
                described += word_count(clause)
    if declined is None or described >= DESCRIPTION_WORDS:
        return None
    return Refusal(declined[:200])


def _declines(clause: str) -> bool:
    """A declining phrase that opens the clause (at most ``_LEAD_WORDS`` words in): a
    sign "saying I cannot help myself" further in is something the image shows, and a
    clause that opens with an article ("A book titled I Can't Help Falling in Love")
    describes a thing, it does not speak for the model."""
    for pattern in _DECLINE:
        m = pattern.search(clause)
        if not m or not m.start():
            if m:
                return True
            continue
        lead = clause[:m.start()]
        words = _WORD.findall(_CJK.sub(" ", lead))
        if words and words[0].casefold() in _ARTICLES:
            continue
        # CJK has no spaces: about four characters make a word's worth of lead.
        if len(_CJK.findall(lead)) // 4 + len(words) <= _LEAD_WORDS:
            return True
    return False


def _clauses(sentence: str) -> list[tuple[str, bool]]:
    """The sentence's clauses, each with whether it declines. An opening apology
    declines with what follows it when that declines or is joined by "but"."""
    apology = _APOLOGY.match(sentence)
    rest = sentence[apology.end():] if apology else sentence
    parts = [p for p in _BUT.split(rest) if p and p.strip()]
    marks = [_declines(part) for part in parts]
    if apology and (not parts or marks[0] or _BUT_FIRST.match(rest)):
        return [(apology.group(0) + (parts[0] if parts else ""), True)] + \
            list(zip(parts[1:], marks[1:]))
    if apology and parts:
        parts[0] = apology.group(0) + parts[0]  # "I'm sorry to see ...": description
    return list(zip(parts, marks))
