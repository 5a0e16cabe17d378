"""Scripted answers of the local gateway SIMULATOR: captions a quality gate must catch.

A prompt containing one of these triggers gets a scripted answer instead of its
caption (the gate's tests and the demo use them):

* ``[soft-refuse]`` (``[soft-refuse:de]``, ``:fr``, ``:es``, ``:zh``): a refusal in
  the text, finished with ``stop`` (no refusal field, no content filter);
* ``[long]``: the caption followed by about 200 words of padding;
* ``[repeat]``: one text, the same for every image;
* ``[boilerplate]``: the caption wrapped in chat ("Sure! Here is a caption: ...");
* ``[lang:fr]`` (``de``, ``es``): a caption in that language;
* ``[near-miss]``: a real caption that uses refusal-like words (a sign that reads
  "Sorry, we can't help you today"), which a gate must let through.

A request that carries an earlier answer of the model (a re-ask) gets the real
caption, as a model that was told what was wrong would answer; a trigger ending in
``!`` (``[long!]``) answers the script every time, to try a re-ask that fails too.

It deliberately imports nothing from the client (pipeline.sse, pipeline.adapters, ...).
"""

from __future__ import annotations

import re

from .captions import Prompt

__all__ = ["SCRIPT_HELP", "scripted_text"]

_TRIGGER = re.compile(
    r"\[(soft-refuse|long|repeat|boilerplate|lang|near-miss)(?::([a-z]{2}))?(!)?\]")
SCRIPT_HELP = (
    ("a prompt containing [soft-refuse] (or [soft-refuse:de|fr|es|zh])",
     "a refusal written as the caption, finish_reason stop"),
    ("a prompt containing [long]", "the caption padded to about 200 words"),
    ("a prompt containing [repeat]", "the same caption text for every image"),
    ("a prompt containing [boilerplate]", "the caption wrapped in chat ('Sure! Here is ...')"),
    ("a prompt containing [lang:fr] (or de, es)", "a caption in that language"),
    ("a prompt containing [near-miss]", "a real caption with refusal-like words in it"),
    ("any of those, re-asked", "the real caption (a trigger ending in ! keeps its script)"),
)
_REFUSALS = {
    "en": "I'm sorry, but I can't help with identifying or describing this image.",
    "de": "Es tut mir leid, aber ich kann bei der Beschreibung dieses Bildes nicht helfen.",
    "fr": "Je suis désolé, mais je ne peux pas décrire cette image.",
    "es": "Lo siento, pero no puedo describir esta imagen.",
    "zh": "抱歉，我无法描述这张图片。",
}
_FOREIGN = {
    "fr": "Une photographie de {w} sur {h} pixels, prise à la lumière du jour, avec des "
          "couleurs douces et un contraste moyen.",
    "de": "Ein Foto mit {w} mal {h} Pixeln, bei Tageslicht aufgenommen, mit sanften Farben "
          "und mittlerem Kontrast.",
    "es": "Una fotografía de {w} por {h} píxeles, tomada con luz del día, con colores "
          "suaves y un contraste medio.",
}
_PADDING = ("Around the subject, the rest of the frame continues in much the same tones, "
            "with no further detail that changes what the picture shows. ")
REPEATED = "A photograph of an object in front of a plain background."


def scripted_text(prompt: Prompt, caption: str) -> str | None:
    """The scripted answer the prompt asks for, or None (answer ``caption``)."""
    m = _TRIGGER.search(prompt.text)
    if m is None or (prompt.followup and not m.group(3)):
        return None
    kind, lang = m.group(1), m.group(2)
    if kind == "soft-refuse":
        return _REFUSALS.get(lang or "en", _REFUSALS["en"])
    if kind == "long":
        return caption + " " + (_PADDING * 8).strip()
    if kind == "near-miss":
        return "I'm sorry to say the shop looks closed: a hand-written sign in its window " \
               f"reads \"Sorry, we can't help you today\". {caption}"
    if kind == "repeat":
        return REPEATED
    if kind == "boilerplate":
        return f"Sure! Here is a caption for the image: {caption} Let me know if you " \
               "need anything else."
    image = prompt.images[0] if prompt.images else None
    w, h = (image.width, image.height) if image else (0, 0)
    return _FOREIGN.get(lang or "fr", _FOREIGN["fr"]).format(w=w, h=h)
