"""The scenes world's language: a palette, four shapes, and captions from a grammar over GenEval's six
categories (single object, two objects, counting, colours, position, colour attribution).

A caption's *meaning* (:class:`Meaning`) is what the renderer draws and what the exact judge checks;
:func:`caption` writes a meaning with one of several templates and :func:`parse_prompt` reads it back.
Held-out evaluation prompts are (a) paraphrase templates never used in training (``TEST_TEMPLATES``) and
(b) colour-shape pairs that never appear in pretraining, in RL prompts or in any pretraining image
(``HELD_OUT_PAIRS``): compositional generalisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

__all__ = ["PALETTE", "BACKGROUND", "COLORS", "SHAPES", "CATEGORIES", "RELATIONS", "COUNT_WORDS", "HELD_OUT_PAIRS",
           "TRAIN_TEMPLATES", "TEST_TEMPLATES", "Obj", "Meaning", "caption", "parse_prompt", "sample_meaning",
           "wrong_meaning", "ATTRIBUTE_ERRORS", "content_words", "drop_filler_words", "vocabulary", "prompt_sets",
           "allowed_pairs", "OPPOSITE"]

#: Object colours (RGB in [0, 1]); pairwise distances >= 1, so nearest-colour segmentation is unambiguous.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "bar")
PLURALS = {s: s + "s" for s in SHAPES}
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: relation phrase -> (axis, sign): "A left of B" means x_A < x_B
RELATIONS: dict[str, tuple[str, int]] = {"to the left of": ("x", -1), "to the right of": ("x", 1),
                                         "above": ("y", -1), "below": ("y", 1)}
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
#: colour-shape pairs never drawn in pretraining nor named in RL prompts (compositional generalisation)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "bar"), ("blue", "circle"),
                                                        ("yellow", "square")})

# {a}/{b}: "colour shape" or "shape"; {n}: count word; {rel}: relation phrase; {as}: "colour shapes" (plural)
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("a {a}", "one {a}", "an image of a {a}", "a single {a}"),
    "colors": ("a {a}", "one {a}", "an image of a {a}", "a single {a}"),
    "two_object": ("a {a} and a {b}", "an image of a {a} and a {b}", "a {a} together with a {b}"),
    "color_attr": ("a {a} and a {b}", "an image of a {a} and a {b}", "a {a} together with a {b}"),
    "counting": ("{n} {as}", "an image of {n} {as}", "exactly {n} {as}"),
    "position": ("a {a} {rel} a {b}", "an image of a {a} {rel} a {b}", "one {a} {rel} one {b}"),
}
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("a picture containing a {a}", "there is a {a}"),
    "colors": ("a picture containing a {a}", "there is a {a}"),
    "two_object": ("a picture containing a {a} and a {b}", "there is a {a} and a {b}"),
    "color_attr": ("a picture containing a {a} and a {b}", "there is a {a} and a {b}"),
    "counting": ("a picture containing {n} {as}", "there are {n} {as}"),
    "position": ("a picture containing a {a} {rel} a {b}", "there is a {a} {rel} a {b}"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str | None = None  # None: any colour (the caption names none)

    def words(self, plural: bool = False) -> str:
        noun = PLURALS[self.shape] if plural else self.shape
        return noun if self.color is None else f"{self.color} {noun}"


@dataclass(frozen=True)
class Meaning:
    """What a caption asks for: ``a`` (and ``b``), ``count`` copies of ``a`` (counting), ``a relation b``."""

    category: str
    a: Obj
    b: Obj | None = None
    count: int = 1
    relation: str | None = None

    def objects(self) -> list[Obj]:
        return [self.a] * self.count + ([self.b] if self.b is not None else [])

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in (self.a, self.b) if o is not None and o.color is not None}


def caption(m: Meaning, template: str) -> str:
    """``m`` written with ``template`` (a count of one, which only a wrong meaning has, reads "one <object>")."""
    if m.category == "counting" and m.count == 1:
        return f"one {m.a.words()}"
    return template.format(a=m.a.words(), b=m.b.words() if m.b else "", n=COUNT_WORDS.get(m.count, ""),
                           rel=m.relation or "", **{"as": m.a.words(plural=True)})


_SINGULAR = {PLURALS[s]: s for s in SHAPES} | {s: s for s in SHAPES}
_COUNT_OF = {w: n for n, w in COUNT_WORDS.items()}


def parse_prompt(prompt: str) -> Meaning:
    """The meaning of a scenes caption (any template, train or test); ValueError names what cannot be read."""
    text = " ".join(re.findall(r"[a-z]+", prompt.lower()))
    relation = next((r for r in RELATIONS if f" {r} " in f" {text} "), None)
    words = text.split()
    objs: list[Obj] = []
    plural = False
    for i, w in enumerate(words):
        if w in _SINGULAR:
            color = words[i - 1] if i > 0 and words[i - 1] in PALETTE else None
            objs.append(Obj(_SINGULAR[w], color))
            plural = plural or w != _SINGULAR[w]
    counts = [_COUNT_OF[w] for w in words if w in _COUNT_OF]
    if not objs:
        raise ValueError(f"scenes prompt {prompt!r} names no shape ({', '.join(SHAPES)})")
    if len(objs) > 2 or len(counts) > 1:
        raise ValueError(f"scenes prompt {prompt!r} names more than two objects or counts")
    if counts or plural:
        if len(objs) != 1 or not counts or not plural:
            raise ValueError(f"scenes prompt {prompt!r}: a count takes one plural shape, e.g. 'three red circles'")
        return Meaning("counting", objs[0], count=counts[0])
    if relation is not None:
        if len(objs) != 2:
            raise ValueError(f"scenes prompt {prompt!r}: a position needs two objects")
        return Meaning("position", objs[0], objs[1], relation=relation)
    if len(objs) == 1:
        return Meaning("colors" if objs[0].color else "single_object", objs[0])
    if (objs[0].color is None) != (objs[1].color is None):
        raise ValueError(f"scenes prompt {prompt!r}: give both objects a colour or neither")
    if objs[0].shape == objs[1].shape:
        raise ValueError(f"scenes prompt {prompt!r}: two objects of one shape is a count")
    return Meaning("color_attr" if objs[0].color else "two_object", objs[0], objs[1])


def _pick_color(rng: random.Random, shape: str, allowed: frozenset[tuple[str, str]] | None,
                exclude: set[str] = frozenset()) -> str:
    options = [c for c in COLORS if c not in exclude and (allowed is None or (c, shape) in allowed)]
    return rng.choice(options)


def allowed_pairs(held_out: bool) -> frozenset[tuple[str, str]]:
    """Colour-shape pairs of the training distribution (``held_out=False``) or every pair (``True``)."""
    every = frozenset((c, s) for c in COLORS for s in SHAPES)
    return every if held_out else every - HELD_OUT_PAIRS


def sample_meaning(rng: random.Random, category: str, pairs: frozenset[tuple[str, str]] | None = None) -> Meaning:
    """A random meaning of ``category`` whose colour-shape pairs lie in ``pairs`` (default: the training ones)."""
    pairs = allowed_pairs(False) if pairs is None else pairs
    s1, s2 = rng.sample(SHAPES, 2)
    if category == "single_object":
        return Meaning(category, Obj(s1))
    if category == "two_object":
        return Meaning(category, Obj(s1), Obj(s2))
    c1 = _pick_color(rng, s1, pairs)
    if category == "colors":
        return Meaning(category, Obj(s1, c1))
    if category == "counting":
        return Meaning(category, Obj(s1, c1), count=rng.choice(sorted(COUNT_WORDS)))
    c2 = _pick_color(rng, s2, pairs, exclude={c1})
    if category == "color_attr":
        return Meaning(category, Obj(s1, c1), Obj(s2, c2))
    if category == "position":
        return Meaning(category, Obj(s1, c1), Obj(s2, c2), relation=rng.choice(sorted(RELATIONS)))
    raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


#: The one-attribute errors each category can make (what the exact judge must refuse).
ATTRIBUTE_ERRORS: dict[str, tuple[str, ...]] = {
    "single_object": ("shape",), "colors": ("color", "shape"), "two_object": ("shape",),
    "color_attr": ("attribution", "color", "shape"), "counting": ("count", "color", "shape"),
    "position": ("position", "color", "shape")}


def wrong_meaning(m: Meaning, kind: str, rng: random.Random) -> Meaning:
    """``m`` with exactly one attribute wrong (``kind`` in ``ATTRIBUTE_ERRORS[m.category]``): what an image of
    it shows is not what ``m``'s caption asks for."""
    if kind not in ATTRIBUTE_ERRORS[m.category]:
        raise ValueError(f"{m.category} has no {kind!r} error; it has {ATTRIBUTE_ERRORS[m.category]}")
    used_shapes = {o.shape for o in (m.a, m.b) if o is not None}
    target = "a" if m.b is None or rng.random() < 0.5 else "b"
    obj: Obj = getattr(m, target)
    if kind == "shape":
        return replace(m, **{target: replace(obj, shape=rng.choice([s for s in SHAPES if s not in used_shapes]))})
    if kind == "color":
        used = {o.color for o in (m.a, m.b) if o is not None}
        return replace(m, **{target: replace(obj, color=rng.choice([c for c in COLORS if c not in used]))})
    if kind == "count":
        options = [n for n in (m.count - 1, m.count + 1) if 1 <= n <= max(COUNT_WORDS)]
        return replace(m, count=rng.choice(options))
    if kind == "position":
        return replace(m, relation=OPPOSITE[m.relation])
    if kind == "attribution":
        return replace(m, a=replace(m.a, color=m.b.color), b=replace(m.b, color=m.a.color))
    raise AssertionError(kind)


def content_words() -> frozenset[str]:
    """The words that carry a caption's meaning: colours, shapes (and plurals), counts and relation words."""
    words = set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(COUNT_WORDS.values())
    return frozenset(words | {w for r in RELATIONS for w in r.split()})


def drop_filler_words(prompt: str, rng: random.Random, p: float) -> str:
    """``prompt`` with each word that is not a :func:`content_words` word replaced, with chance ``p``, by
    ``<unk>`` (a word no text encoder of the world knows): word dropout for pretraining."""
    if p <= 0:
        return prompt
    keep = content_words()
    return " ".join(w if w in keep or rng.random() >= p else "<unk>" for w in prompt.split())


def vocabulary(test_templates: bool = True) -> list[str]:
    """Every word of the templates (the held-out paraphrases' too, unless ``test_templates=False``), colours,
    shapes, counts and relations (sorted)."""
    words = set(content_words())
    for table in (TRAIN_TEMPLATES, TEST_TEMPLATES) if test_templates else (TRAIN_TEMPLATES,):
        for templates in table.values():
            for t in templates:
                words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t)))
    return sorted(words)


def prompt_sets(seed: int = 0, per_category: int = 8) -> dict[str, list[str]]:
    """The built-in prompt lists: ``train`` (RL prompts: training templates and pairs), ``test_paraphrase``
    (unseen templates, training pairs) and ``test_heldout`` (training templates, each naming a held-out pair).
    Deterministic given ``seed``; no caption is in two lists."""
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"train": [], "test_paraphrase": [], "test_heldout": []}
    seen: set[str] = set()
    held = allowed_pairs(True)

    def add(key: str, text: str) -> bool:
        if text in seen:
            return False
        seen.add(text)
        out[key].append(text)
        return True

    for category in CATEGORIES:
        for key, templates, pairs in (("train", TRAIN_TEMPLATES, None), ("test_paraphrase", TEST_TEMPLATES, None)):
            n = 0
            while n < per_category:
                n += add(key, caption(sample_meaning(rng, category, pairs), rng.choice(templates[category])))
        if category in ("single_object", "two_object"):
            continue  # no colours named: nothing held out
        n = 0
        while n < per_category // 2:
            m = sample_meaning(rng, category, held)
            if m.pairs() & HELD_OUT_PAIRS:
                n += add("test_heldout", caption(m, rng.choice(TRAIN_TEMPLATES[category])))
    return out
