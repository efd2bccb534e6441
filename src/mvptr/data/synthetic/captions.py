"""Captions of the synthetic world, each with the gold scene-graph tuples a SPICE parser would extract.

Why: MVPTR learns from (image, caption) pairs and from the concepts (objects, attributes,
relations) parsed out of the captions. Generating captions from the scene graph gives both the
text and its exact parse, lemmatised as SPICE would ("two blue squares" -> object "square",
attributes ("square", "two") and ("square", "blue")). Captions mention only some of the objects,
so that a phrase has to find its region.

Templates: attribute phrases ("a small red circle."), spatial relations ("a red circle to the left
of a blue square."), counts ("two blue squares.", only when exactly true), conjunctions ("a red
circle and a blue square."), and paraphrases ("a circle that is red.", "the square is small and
green.", "there is a yellow triangle in the picture.", "an image showing ...").

This module also holds the small English helpers (articles, plurals, noun phrases, tokens) that
the task files reuse, so that every text of the world is worded the same way.

Use:
    captions = caption_scene(np.random.default_rng([seed, 2]), scene, n=5)
    captions[0].text, captions[0].graph()   # "a red circle.", {"objects": ["circle"], ...}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mvptr.data.synthetic.scene import Description, Object, Scene, choose, pick_objects, relation

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATION_PHRASES: dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                                    "above": "above", "below": "below"}
# How often a mention names the colour / the size of its object: colour is the more salient attribute.
_COLOUR_PROB = 0.7
_SIZE_PROB = 0.35
_MAX_TRIES = 1000


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """All shape names are regular English nouns."""
    return shape + "s"


def noun_phrase(desc: Description, *, plural_form: bool = False) -> str:
    """"small red circle" ("small red circles"); without a shape the noun is "object"."""
    noun = desc.shape or "object"
    words = [w for w in (desc.size, desc.colour) if w] + [plural(noun) if plural_form else noun]
    return " ".join(words)


def indefinite(desc: Description) -> str:
    """"a small red circle", "an orange star"."""
    phrase = noun_phrase(desc)
    return f"{article(phrase)} {phrase}"


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens without punctuation, as in Karpathy's and RefCOCO's `tokens`."""
    return re.findall(r"[a-z0-9']+", text.lower())


def random_description(rng: np.random.Generator, obj: Object, *, need_attribute: bool = False) -> Description:
    """A true description of `obj` that names its colour and/or size at random (its shape always)."""
    colour = obj.colour if rng.random() < _COLOUR_PROB else None
    size = obj.size if rng.random() < _SIZE_PROB else None
    if need_attribute and colour is None and size is None:
        colour = obj.colour
    return Description(shape=obj.shape, colour=colour, size=size)


@dataclass(frozen=True)
class Caption:
    """A caption and its gold tuples (lemmas, sorted and de-duplicated like a set of SPICE tuples)."""

    text: str
    template: str
    objects: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]
    relations: tuple[tuple[str, str, str], ...]

    def graph(self) -> dict[str, object]:
        return {"objects": list(self.objects), "attributes": [list(a) for a in self.attributes],
                "relations": [list(r) for r in self.relations], "template": self.template}


def _caption(text: str, template: str, mentions: Sequence[Description],
             counts: Sequence[tuple[str, int]] = (), relations: Sequence[tuple[str, str, str]] = ()) -> Caption:
    """Collect the gold tuples of the described objects, their counts and relations."""
    objects = {d.shape for d in mentions if d.shape}
    attributes = {(d.shape, value) for d in mentions if d.shape for value in (d.colour, d.size) if value}
    attributes |= {(shape, NUMBER_WORDS[n]) for shape, n in counts}
    return Caption(text, template, tuple(sorted(objects)), tuple(sorted(attributes)), tuple(sorted(set(relations))))


def _attribute(rng: np.random.Generator, scene: Scene) -> Caption | None:
    (obj,) = pick_objects(rng, scene, 1)
    desc = random_description(rng, obj, need_attribute=True)
    frame = choose(rng, ("{np}.", "a picture of {np}.", "a close up of {np}.", "{np} on a grey background."))
    return _caption(frame.format(np=indefinite(desc)), "attribute", [desc])


def _relation(rng: np.random.Generator, scene: Scene) -> Caption | None:
    if len(scene.objects) < 2:
        return None
    subject, obj = pick_objects(rng, scene, 2)
    rel = relation(subject, obj)
    s_desc, o_desc = random_description(rng, subject), random_description(rng, obj)
    frame = choose(rng, ("{s} {r} {o}.", "{s} is {r} {o}.", "a picture of {s} {r} {o}."))
    text = frame.format(s=indefinite(s_desc), r=RELATION_PHRASES[rel], o=indefinite(o_desc))
    return _caption(text, "relation", [s_desc, o_desc], relations=[(subject.shape, rel, obj.shape)])


def _count(rng: np.random.Generator, scene: Scene) -> Caption | None:
    # Only descriptions whose exact count in the scene is at least two: counts are always true.
    groups = sorted({d for o in scene.objects for d in (Description(o.shape), Description(o.shape, o.colour))
                     if len(scene.matching(d)) >= 2}, key=noun_phrase)
    if not groups:
        return None
    desc = choose(rng, groups)
    n = len(scene.matching(desc))
    frame = choose(rng, ("{n} {np}.", "there are {n} {np} in the picture.", "a picture of {n} {np}."))
    text = frame.format(n=NUMBER_WORDS[n], np=noun_phrase(desc, plural_form=True))
    return _caption(text, "count", [desc], counts=[(desc.shape, n)])


def _conjunction(rng: np.random.Generator, scene: Scene) -> Caption | None:
    if len(scene.objects) < 2:
        return None
    k = 2 if len(scene.objects) == 2 or rng.random() < 0.7 else 3
    descs = [random_description(rng, o) for o in pick_objects(rng, scene, k)]
    phrases = [indefinite(d) for d in descs]
    if len(set(phrases)) < k:  # "a purple diamond and a purple diamond" reads as a mistake
        return None
    listed = " and ".join(phrases) if k == 2 else f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    frame = choose(rng, ("{list}.", "an image showing {list}.", "a picture of {list}."))
    return _caption(frame.format(list=listed), "conjunction", descs)


def _paraphrase(rng: np.random.Generator, scene: Scene) -> Caption | None:
    (obj,) = pick_objects(rng, scene, 1)
    desc = random_description(rng, obj, need_attribute=True)
    predicate = " and ".join(w for w in (desc.size, desc.colour) if w)
    if rng.random() < 0.5:
        text = f"{article(obj.shape)} {obj.shape} that is {predicate}."
    elif len(scene.matching(Description(obj.shape))) == 1:  # "the" only when there is one of them
        text = f"the {obj.shape} is {predicate}."
    else:
        text = f"one of the {plural(obj.shape)} is {predicate}."
    return _caption(text, "paraphrase", [desc])


def _existential(rng: np.random.Generator, scene: Scene) -> Caption | None:
    (obj,) = pick_objects(rng, scene, 1)
    desc = random_description(rng, obj)
    frame = choose(rng, ("there is {np} in the picture.", "there is {np} in the image.",
                          "an image showing {np}.", "this picture contains {np}."))
    return _caption(frame.format(np=indefinite(desc)), "existential", [desc])


_TEMPLATES: tuple[Callable[[np.random.Generator, Scene], Caption | None], ...] = (
    _attribute, _relation, _count, _conjunction, _paraphrase, _existential)


def caption_scene(rng: np.random.Generator, scene: Scene, n: int) -> list[Caption]:
    """`n` distinct captions of `scene`, templates drawn uniformly among those that apply."""
    captions: list[Caption] = []
    seen: set[str] = set()
    for _ in range(_MAX_TRIES):
        caption = choose(rng, _TEMPLATES)(rng, scene)  # None: the template does not apply to this scene
        if caption is not None and caption.text not in seen:
            seen.add(caption.text)
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"could not write {n} distinct captions for image {scene.image_id}")
