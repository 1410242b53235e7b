"""Mismatched captions for TPO: perturb a caption so that it no longer describes its image.

TPO ("Free Lunch Alignment of Text-to-Image Diffusion Models without Preference Image Pairs", arXiv 2509.25771)
needs no preference image pairs: for an (image, caption) example the caption is chosen and a perturbed caption
is rejected. Its perturbations come in four families: content (objects and counts),
attributes (colour, material, texture, size, style), relations (spatial and motion relations) and context
(setting, weather, lighting, time of day). The paper writes them with an LLM; this module offers both:

- ``RulePerturber``: lexicon swaps, no model. Each lexicon group holds equivalence classes of synonyms
  ("grey" / "gray", "couch" / "sofa"); a matched phrase is only ever replaced by a phrase of a *different*
  class of its group, so the output always differs in meaning, never by a synonym. Relations are inverted
  (left ↔ right, above ↔ below, in front of ↔ behind, moving up ↔ moving down). The paper's "add or remove
  an object" edits need a language model and are left to ``LLMPerturber``.
- ``LLMPerturber``: any local transformers causal LM, one prompt per family, its output validated
  (``validate_output``) and replaced by the rules' perturbation when it is not a usable caption.

Every perturbation is a deterministic function of (seed, key, caption): the key is the example's row, so a
caption's mismatched twin does not depend on the order the data is read in.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmalign.errors import UserError

__all__ = [
    "DEFAULT_TEMPLATES",
    "FAMILIES",
    "LLMPerturber",
    "Perturbation",
    "Perturber",
    "RulePerturber",
    "perturb_all",
    "validate_output",
]

FAMILIES = ("content", "attributes", "relations", "context")


@dataclass(frozen=True)
class Perturbation:
    text: str  # the perturbed caption
    family: str  # one of FAMILIES
    rule: str  # human-readable record of what changed, e.g. "colour: red -> blue"


class Perturber(Protocol):
    def perturb(self, caption: str, key: int) -> Perturbation | None: ...


# ------------------------------------------------------------------------------------------------- lexicon
#
# A group is a list of equivalence classes; "a/b" lists synonyms, the first one is what a replacement writes.
# Swap groups come in tiers: a phrase is replaced by another class of its own tier. The first tier of a group
# is the closed vocabulary of the toy worlds (``mmalign.toy.shapes``, ``mmalign.toy.moving``) and of most
# captions, so a toy caption stays inside its grammar and a common word becomes another common word.


@dataclass(frozen=True)
class _Group:
    family: str
    name: str  # the rule record's prefix: "colour", "position"
    classes: tuple[tuple[str, ...], ...]  # synonyms; the first member is the written form
    moves: tuple[tuple[int, ...], ...]  # per class, the classes it may become
    nouns: bool  # countable nouns: plurals are matched too, and a replacement keeps the number


def _class(spec: str) -> tuple[str, ...]:
    return tuple(spec.split("/"))


def _swaps(family: str, name: str, *tiers: str, nouns: bool = False) -> _Group:
    """Every class may become any other class of its tier; a tier is written "red, green, grey/gray" (a
    two-class tier is an inversion: "above, below")."""
    classes, moves = [], []
    for tier in tiers:
        first = len(classes)
        specs = [spec.strip() for spec in tier.split(",")]
        members = range(first, first + len(specs))
        classes.extend(_class(spec) for spec in specs)
        moves.extend(tuple(j for j in members if j != i) for i in members)
    return _Group(family, name, tuple(classes), tuple(moves), nouns)


def _directed(family: str, name: str, moves: dict[str, Sequence[str]]) -> _Group:
    """Explicit moves: each key (a class) may become the classes whose first member is listed; a class that
    may become nothing is matched only to keep its words from matching shorter phrases."""
    classes = [_class(spec) for spec in moves]
    head = {members[0]: i for i, members in enumerate(classes)}
    targets = tuple(tuple(head[word] for word in words) for words in moves.values())
    return _Group(family, name, tuple(classes), targets, False)


_CONTENT = [
    _swaps(
        "content",
        "shape",
        "circle, square, triangle",
        "rectangle, star, heart, hexagon, pentagon, oval/ellipse, diamond/rhombus",
        "cube, sphere, cone, cylinder, pyramid",
        nouns=True,
    ),
    _swaps(
        "content",
        "animal",
        "dog/puppy/doggy, cat/kitten/kitty, horse/pony, cow/bull, pig, goat, bird, rabbit/bunny, bear, lion, "
        "tiger, elephant, giraffe, zebra, monkey, fox, wolf, mouse, squirrel, frog, turtle/tortoise, snake, "
        "butterfly, donkey, camel, kangaroo, panda, koala, hedgehog",
        # kinds of bird and of sea animal, never swapped for "bird", the class that holds them all
        "duck, chicken/hen, owl, parrot, eagle, penguin, swan, pigeon, dolphin, shark, whale, octopus",
        nouns=True,
    ),
    _swaps(
        "content",
        "person",
        "man/gentleman, woman/lady, boy, girl, baby/infant",
        "doctor, chef/cook, firefighter/fireman, police officer/policeman, soldier, astronaut, nurse, pilot, "
        "farmer, teacher, knight, wizard, pirate, robot, cowboy",
        nouns=True,
    ),
    _swaps(
        "content",
        "vehicle",
        "car/automobile, bus, truck/lorry, bicycle/bike, motorcycle/motorbike, train, boat, ship, "
        "airplane/aeroplane/plane, helicopter, tractor, van, scooter, rocket, submarine",
        nouns=True,
    ),
    _swaps(
        "content",
        "furniture",
        "table, chair, couch/sofa, bed, desk, bench, stool, shelf/bookshelf, cabinet/cupboard",
        nouns=True,
    ),
    _swaps(
        "content",
        "food",
        "apple, banana, pear, lemon, strawberry, cherry, pineapple, watermelon, tomato, carrot, pizza, cake, "
        "sandwich, burger/hamburger, hot dog, donut/doughnut, cupcake, cookie, croissant, egg, taco, pie, "
        "ice cream",
        nouns=True,
    ),
    _swaps(
        "content",
        "building",
        "house/cottage, cabin/hut/shack, castle, palace, church/chapel/cathedral, temple, mosque, tower, "
        "skyscraper, lighthouse, barn, windmill, tent, igloo, bridge",
        nouns=True,
    ),
    _swaps(
        "content",
        "plant",
        "tree, flower, bush/shrub, cactus, mushroom",
        "rose, tulip, sunflower, daisy, lily, orchid",
        nouns=True,
    ),
    _swaps(
        "content",
        "object",
        "cup/mug, bottle, vase, bowl, plate, lamp, clock, book, laptop, phone/smartphone/cellphone/mobile phone, "
        "television/tv, umbrella, candle, mirror, pillow/cushion, basket, box, backpack/rucksack, suitcase, "
        "ball, kite, balloon, teddy bear, snowman",
        "guitar, piano, violin, drum, trumpet, saxophone, flute",
        nouns=True,
    ),
    _swaps(
        "content",
        "clothing",
        "hat, scarf, jacket/coat, dress/gown, shirt/t-shirt, sweater/jumper/pullover, skirt, shoe, boot, glove, "
        "sock",
        nouns=True,
    ),
    _swaps(
        "content",
        "container",
        "cup of/mug of, glass of, bowl of, plate of, bottle of, jar of, basket of, box of, bucket of, bag of, "
        "pot of",
        nouns=True,
    ),
]

_ATTRIBUTES = [
    _swaps(
        "attributes",
        "colour",
        "red, green, blue, yellow, magenta/fuchsia, cyan/aqua",
        "black, white, grey/gray, brown, orange, purple/violet, pink, gold, silver, beige, turquoise/teal, "
        "navy blue",
    ),
    _swaps("attributes", "size", "small/little/tiny, large/big/huge/giant/enormous"),
    _swaps("attributes", "size", "tall, short"),
    _swaps("attributes", "size", "thick, thin"),
    _swaps("attributes", "size", "wide, narrow"),
    _swaps(
        "attributes",
        "material",
        "wood/wooden, metal/metallic/steel/iron/aluminium/aluminum, glass, plastic, stone, marble, leather, "
        "paper, ceramic/porcelain, concrete, brick, wool/woollen/woolen, rubber, cardboard, silk, velvet",
    ),
    _swaps("attributes", "texture", "shiny/glossy/polished, matte/dull"),
    _swaps("attributes", "texture", "rough/coarse, smooth"),
    _swaps("attributes", "texture", "wet, dry"),
    _swaps(
        "attributes", "pattern", "striped, spotted/dotted/polka-dot, checkered/chequered/plaid/tartan, floral"
    ),
    _swaps(
        "attributes",
        "style",
        # media, then kinds of painting and drawing (never swapped for "painting" or "drawing"), then styles
        "photo/photograph, painting, drawing/sketch, cartoon, sculpture/statue, 3d render/3d rendering",
        "oil painting, watercolor painting/watercolour painting/watercolor/watercolour, "
        "pencil drawing/pencil sketch, charcoal drawing/charcoal sketch, pixel art, mosaic, comic strip",
        "realistic/photorealistic/lifelike, cartoonish/cartoony, impressionist/impressionistic, cubist, "
        "surreal/surrealist, minimalist, vintage/retro, futuristic, anime/manga, gothic, baroque, art deco, "
        "steampunk, cyberpunk",
    ),
]

# the toy worlds' positions: left ↔ right, top ↔ bottom, and the centre moves to any of the four others
_POSITION = _directed(
    "relations",
    "position",
    {
        "on the left/at the left": ("on the right",),
        "on the right/at the right": ("on the left",),
        "at the top": ("at the bottom",),
        "at the bottom": ("at the top",),
        "in the center/in the centre/in the middle": (
            "on the left",
            "on the right",
            "at the top",
            "at the bottom",
        ),
    },
)
# inverted relations: each pair is two classes that only ever become each other
_RELATION_PAIRS = (
    "to the left, to the right",
    "leftmost, rightmost",
    "above, below",
    "on top of/atop, under/underneath/beneath",
    "in front of, behind/in back of",
    "in the foreground, in the background",
    "inside, outside",
    "into, out of",
    "towards/toward, away from",
    "next to/beside/near/close to, far from/far away from",
    "upward/upwards, downward/downwards",
    "upstairs, downstairs",
    "uphill, downhill",
    "forward/forwards, backward/backwards",
    "clockwise, counterclockwise/counter-clockwise/anticlockwise",
    "left to right/from left to right, right to left/from right to left",
    "top to bottom/from top to bottom, bottom to top/from bottom to top",
    "ascending, descending",
    "entering, exiting/leaving",
)
# verbs after which left / right / up / down is a direction of motion or of gaze ("moving left", "looking up")
_MOTION_VERBS = (
    "move moves moving", "go goes going", "head heads heading", "walk walks walking", "run runs running",
    "fly flies flying", "drive drives driving", "swim swims swimming", "roll rolls rolling", "slide slides sliding",
    "drift drifts drifting", "float floats floating", "turn turns turning", "look looks looking",
    "point points pointing", "face faces facing", "climb climbs climbing", "jump jumps jumping",
    "lean leans leaning",
)  # fmt: skip


def _direction(verb: str) -> _Group:
    """left ↔ right and up ↔ down after ``verb``; "moving up and down" is matched whole and left alone, so it
    never becomes "moving down and down"."""
    return _directed(
        "relations",
        "direction",
        {
            f"{verb} left": (f"{verb} right",),
            f"{verb} right": (f"{verb} left",),
            f"{verb} up": (f"{verb} down",),
            f"{verb} down": (f"{verb} up",),
            f"{verb} left to right/{verb} from left to right": (f"{verb} right to left",),
            f"{verb} right to left/{verb} from right to left": (f"{verb} left to right",),
            f"{verb} up and down": (),
            f"{verb} left and right": (),
        },
    )


_RELATIONS = [
    _POSITION,
    *(_swaps("relations", "relation", pair) for pair in _RELATION_PAIRS),
    *(_direction(verb) for forms in _MOTION_VERBS for verb in forms.split()),
]

_CONTEXT = [
    _swaps(
        "context",
        "setting",
        # places one is "on", then places one is "in": a swap keeps the preposition right
        # ("on a sunny beach" -> "on a sunny street", "in a dark forest" -> "in a dark kitchen")
        "beach/seashore/seaside, street/road, mountain/mountaintop, hill/hillside, lake, river, farm, moon, "
        "grass/lawn, rooftop/roof, sidewalk/pavement",
        "forest/woods, jungle/rainforest, desert, city, village/town, park, field/meadow, garden/backyard, "
        "kitchen, living room, bedroom, bathroom, office, classroom, library, restaurant, cafe/café, museum, "
        "cave, ocean/sea, outer space, swamp/marsh, mountains",
    ),
    _swaps("context", "setting", "indoors, outdoors"),
    _swaps("context", "setting", "indoor, outdoor"),
    _swaps(
        "context",
        "weather",
        "sunny, rainy, snowy, foggy/misty, cloudy/overcast, stormy, windy",
        "in the rain, in the snow, in the fog/in the mist, in a storm/in the storm/during a storm, "
        "in the sun/in the sunshine",
    ),
    _swaps(
        "context",
        "lighting",
        "dimly lit/poorly lit, brightly lit/well lit/well-lit, candlelit/candle-lit, sunlit, moonlit, backlit, "
        "neon-lit/neon lit",
        "in sunlight/in the sunlight/in bright sunlight, in the shade/in shadow/in the shadows, "
        "by candlelight/in candlelight, in moonlight/in the moonlight/by moonlight, "
        "under neon lights/in neon light/under neon light",
    ),
    _swaps("context", "lighting", "dark/dim, bright"),
    _swaps(
        "context",
        "time",
        # tiers keep overlapping times apart: "in the evening" never becomes "at night"
        "at night/at nighttime/at night time/during the night/in the night, "
        "during the day/in the daytime/during daytime/by day",
        "at sunrise/at dawn/at daybreak, at noon/at midday, at sunset/at dusk/at twilight",
        "in the morning, in the afternoon, in the evening",
    ),
    _swaps(
        "context",
        "season",
        "in winter/in the winter/during winter/in wintertime, in summer/in the summer/during summer, "
        "in spring/in the spring/in springtime, in autumn/in the autumn/in the fall/in fall",
        "winter/wintertime, summer/summertime, autumn",
    ),
]


_GROUPS: tuple[_Group, ...] = (*_CONTENT, *_ATTRIBUTES, *_RELATIONS, *_CONTEXT)

# counts: explicit number words and numerals only, never the articles "a" / "an"
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip
_COUNTS = range(1, 11)  # what a count may become
_NUMERAL = re.compile(r"(?<![\w.,:/-])\d{1,2}(?![\w-]|[.,:/]\d)")

# -------------------------------------------------------------------------------------------- inflection

_IRREGULAR_PLURALS = {
    "mouse": "mice",
    "wolf": "wolves",
    "shelf": "shelves",
    "bookshelf": "bookshelves",
    "scarf": "scarves",
    "cactus": "cacti",
    "octopus": "octopuses",
    "tomato": "tomatoes",
}


def _plural_word(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("man"):  # woman, fireman, snowman
        return word[:-3] + "men"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _pluralise(noun: str) -> str:
    """The plural of a lexicon noun phrase: its last word, or the word before "of" ("cups of")."""
    words = noun.split()
    head = len(words) - 2 if words[-1] == "of" else len(words) - 1
    words[head] = _plural_word(words[head])
    return " ".join(words)


def _match_case(source: str, replacement: str) -> str:
    """Write ``replacement`` in the case of ``source``: UPPER, Capitalised or as is."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


# ------------------------------------------------------------------------------------------------ matching


@dataclass(frozen=True)
class _Entry:
    group: int  # index into _GROUPS
    cls: int
    plural: bool
    singular: str  # the member this form inflects


def _build_index() -> dict[str, _Entry]:
    """Every matchable form → its entry; a form in two places would make matching ambiguous."""
    index: dict[str, _Entry] = {}
    for g, group in enumerate(_GROUPS):
        for c, members in enumerate(group.classes):
            for member in members:
                forms = [(member, False)] + ([(_pluralise(member), True)] if group.nouns else [])
                for form, plural in forms:
                    if form in index or form in _NUMBER_WORDS:
                        raise ValueError(f"lexicon form {form!r} appears twice")
                    index[form] = _Entry(g, c, plural, member)
    return index


_INDEX = _build_index()


def _longest_first(form: str) -> tuple[int, str]:
    return -len(form), form


def _form_pattern(form: str) -> str:
    return r"\s+".join(re.escape(word) for word in form.split())


# longest forms first, so "in front of" wins over "front" and "hot dog" over "dog"; a hyphen counts as part
# of a word, so "t-shirt" is not "shirt"
_PHRASE = re.compile(
    r"(?<![\w-])(?:"
    + "|".join(_form_pattern(form) for form in sorted([*_INDEX, *_NUMBER_WORDS], key=_longest_first))
    + r")(?![\w-])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Site:
    start: int
    end: int
    text: str  # as written in the caption
    entry: _Entry | None  # None: a count
    count: int = 0

    @property
    def family(self) -> str:
        return "content" if self.entry is None else _GROUPS[self.entry.group].family

    @property
    def written(self) -> str:
        return " ".join(self.text.lower().split())


def _sites(caption: str) -> list[_Site]:
    """Every lexicon phrase and count of the caption, left to right, non-overlapping."""
    sites = []
    for match in _PHRASE.finditer(caption):
        form = " ".join(match.group().lower().split())
        if form in _NUMBER_WORDS:
            sites.append(_Site(match.start(), match.end(), match.group(), None, _NUMBER_WORDS.index(form)))
        else:
            sites.append(_Site(match.start(), match.end(), match.group(), _INDEX[form]))
    for match in _NUMERAL.finditer(caption):
        sites.append(_Site(match.start(), match.end(), match.group(), None, int(match.group())))
    return sorted(sites, key=attrgetter("start"))


# ------------------------------------------------------------------------------------------------ outcomes

_Edit = tuple[int, int, str]  # (start, end, replacement)
_Outcome = tuple[tuple[_Edit, ...], str]  # edits and the rule record


def _swap_outcomes(site: _Site) -> list[_Outcome]:
    group = _GROUPS[site.entry.group]
    outcomes = []
    for target in group.moves[site.entry.cls]:
        word = group.classes[target][0]
        if site.entry.plural:
            word = _pluralise(word)
        edit = (site.start, site.end, _match_case(site.text, word))
        outcomes.append(((edit,), f"{group.name}: {site.written} -> {word}"))
    return outcomes


def _counted_noun(site: _Site, sites: list[_Site], caption: str) -> _Site | None:
    """The lexicon noun a count qualifies: the first one after it, at most two plain words away ("two small
    brown dogs"), with no "of" or "and" between ("one of the dogs" is not "one dog")."""
    for other in sites:
        if other.start < site.end or other.entry is None or not _GROUPS[other.entry.group].nouns:
            continue
        gap = caption[site.end : other.start].split()
        plain = all(word.isalpha() and word.lower() not in ("of", "and") for word in gap)
        return other if len(gap) <= 2 and plain else None
    return None


def _count_outcomes(site: _Site, sites: list[_Site], caption: str) -> list[_Outcome]:
    """A different number. The counted noun, when the lexicon knows it, is inflected to agree; "one" without a
    known singular noun after it is left alone (it is often a pronoun: "the one on the left")."""
    noun = _counted_noun(site, sites, caption)
    singular = noun is not None and not noun.entry.plural
    plural = noun is not None and noun.entry.plural
    if site.count == 1 and not singular:
        return []
    outcomes = []
    for value in _COUNTS:
        if value == site.count or (value == 1 and not plural):
            continue
        written = str(value) if site.text.isdigit() else _NUMBER_WORDS[value]
        edits = [(site.start, site.end, _match_case(site.text, written))]
        if site.count == 1:
            edits.append((noun.start, noun.end, _match_case(noun.text, _pluralise(noun.entry.singular))))
        elif value == 1:
            edits.append((noun.start, noun.end, _match_case(noun.text, noun.entry.singular)))
        outcomes.append((tuple(edits), f"count: {site.written} -> {written}"))
    return outcomes


_ARTICLE = re.compile(r"(?<![\w-])(an?)(\s+)$", re.IGNORECASE)


def _apply(caption: str, edits: Sequence[_Edit]) -> str:
    """Apply the edits right to left, making an "a" / "an" just before an edit agree with its new word."""
    text = caption
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
        article = _ARTICLE.search(text[:start])
        if article:
            agreed = "an" if replacement[:1].lower() in "aeiou" else "a"
            text = text[: article.start()] + _match_case(article.group(1), agreed) + text[article.start(2) :]
    return text


# --------------------------------------------------------------------------------------------------- rules


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    unknown = [family for family in families if family not in FAMILIES]
    if unknown or not families:
        got = ", ".join(repr(family) for family in unknown) if unknown else "none"
        raise UserError(f"perturbation families must be among {', '.join(FAMILIES)}, got {got}")
    return tuple(families)


def _rng(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([seed, key])


class RulePerturber:
    """Lexicon perturbations in TPO's four families (arXiv 2509.25771), no model needed.

    - content: an object becomes another object of its kind (dog → horse, car → bus, circle → square), or a
      count changes (two → five; the counted noun follows when the lexicon knows it: one dog → three dogs);
    - attributes: colour, size, material, texture, pattern or artistic style;
    - relations: a spatial or motion relation is inverted (on the left ↔ on the right, above ↔ below,
      inside ↔ outside, in front of ↔ behind, towards ↔ away from, moving up ↔ moving down); a toy shape
      "in the center" moves to one of the four other positions;
    - context: setting, weather, lighting, time of day or season.

    For a caption, ``perturb`` draws a family among those with an applicable rule, then a matched phrase, then
    its replacement, each uniformly, from ``numpy.random.default_rng([seed, key])``. Matching is whole-word
    and case-insensitive, longest phrase first; a replacement keeps the matched phrase's capitalisation and
    the "a" / "an" before it agrees with it.
    """

    def __init__(self, families: Sequence[str] = FAMILIES, seed: int = 0):
        self.families = _check_families(families)
        self.seed = seed

    def perturb(self, caption: str, key: int, *, family: str | None = None) -> Perturbation | None:
        """The perturbation of ``caption`` for example ``key``; None when no rule of the families applies.

        ``family``: perturb in this family only (one of the perturber's families)."""
        if family is not None and family not in self.families:
            raise UserError(
                f"family {family!r} is not one of this perturber's families ({', '.join(self.families)})"
            )
        options = self._options(caption)
        rng = _rng(self.seed, key)
        if family is None:
            applicable = [name for name in self.families if options[name]]
            if not applicable:
                return None
            family = applicable[rng.integers(len(applicable))]
        if not options[family]:
            return None
        choices = options[family]
        outcomes = choices[rng.integers(len(choices))]
        edits, rule = outcomes[rng.integers(len(outcomes))]
        return Perturbation(_apply(caption, edits), family, rule)

    def _options(self, caption: str) -> dict[str, list[list[_Outcome]]]:
        """Per family, the outcomes of each matched phrase that can change (empty lists dropped)."""
        sites = _sites(caption)
        options: dict[str, list[list[_Outcome]]] = {family: [] for family in self.families}
        for site in sites:
            if site.family not in options:
                continue
            outcomes = _swap_outcomes(site) if site.entry else _count_outcomes(site, sites, caption)
            if outcomes:
                options[site.family].append(outcomes)
        return options


# ----------------------------------------------------------------------------------------------------- LLM

_CHANGES = {
    "content": "replace one object with a different kind of object, or change how many of something there are",
    "attributes": "change one attribute of an object: its colour, material, texture, size or style",
    "relations": "invert one spatial or motion relation (left and right, above and below, inside and outside, "
    "in front of and behind, towards and away from)",
    "context": "change the background or setting, the weather, the lighting or the time of day",
}
DEFAULT_TEMPLATES = {
    family: "Rewrite the image caption below so that it no longer matches the image: "
    f"{change}. Change only that and keep every other word. Answer with the new caption only.\n"
    "Caption: {caption}\nNew caption:"
    for family, change in _CHANGES.items()
}
# sampling settings of ours: the paper does not state its LLM's decoding
TEMPERATURE = 0.7
TOP_P = 0.9
# an output sharing less than this word-sequence similarity with the caption is a rewrite, not an edit
MIN_SIMILARITY = 0.5

_PREFIX = re.compile(
    r"^(?:(?:new|perturbed|rewritten|modified|mismatched|changed)\s+)?(?:caption|answer|output)\s*[:\-–]\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’*"


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate_output(original: str, candidate: str, prompt: str) -> str | None:
    """The LLM's answer cleaned into a caption, or None when it is no usable perturbation of ``original``.

    Cleaning: the first non-empty line (the next one when it is a lead-in ending in ":"), without
    "Caption:" / "New caption:"-style prefixes and surrounding quotes, whitespace collapsed. Rejected: an empty
    answer; the original again (ignoring case, spaces and punctuation); an answer that is part of the prompt's
    instruction or contains one of its sentences; and a word-sequence similarity to the original below
    ``MIN_SIMILARITY`` — TPO's mismatched caption is an edit of the caption, not a new text.
    """
    lines = [line.strip() for line in candidate.splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    cleaned = " ".join(_PREFIX.sub("", line.strip(_QUOTES).strip()).strip(_QUOTES).split())
    words, source = _normalise(cleaned), _normalise(original)
    if not words or words == source:
        return None
    instruction = [_normalise(part) for part in re.split(r"[\n.!?]", prompt.replace(original, "\n"))]
    if words in " ".join(instruction) or any(
        len(part.split()) >= 4 and part in words for part in instruction
    ):
        return None
    if difflib.SequenceMatcher(None, source.split(), words.split()).ratio() < MIN_SIMILARITY:
        return None
    return cleaned


def _word_diff(original: str, text: str) -> str:
    """What changed, word by word: "red -> blue; + at night"."""
    a, b = original.split(), text.split()
    parts = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        if tag == "replace":
            parts.append(f"{' '.join(a[i1:i2])} -> {' '.join(b[j1:j2])}")
        elif tag == "delete":
            parts.append(f"- {' '.join(a[i1:i2])}")
        elif tag == "insert":
            parts.append(f"+ {' '.join(b[j1:j2])}")
    return "; ".join(parts)


class LLMPerturber:
    """TPO's perturbations written by a local causal LM (arXiv 2509.25771), with the rules as a safety net.

    ``model_path``: a transformers causal LM folder (config.json, weights, tokenizer files), loaded offline.
    For example ``key`` a family is drawn from ``families`` and its prompt (``templates``, default
    ``DEFAULT_TEMPLATES``; "{caption}" marks the caption) is sent through the tokenizer's chat template when it
    has one, else as plain text; sampling is seeded from (seed, key), so the result is deterministic. An answer
    ``validate_output`` rejects is replaced by ``fallback``'s perturbation in the same family (default: a
    ``RulePerturber`` of the same families and seed), its rule prefixed "fallback: "; None when the rules
    cannot perturb the caption either.
    """

    def __init__(
        self,
        model_path: str,
        families: Sequence[str] = FAMILIES,
        seed: int = 0,
        *,
        fallback: RulePerturber | None = None,
        max_new_tokens: int = 40,
        templates: dict[str, str] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.families = _check_families(families)
        self.seed = seed
        self.fallback = fallback if fallback is not None else RulePerturber(self.families, seed)
        missing = [family for family in self.families if family not in self.fallback.families]
        if missing:
            raise UserError(
                f"the fallback rules lack the families {', '.join(missing)}; they need all of {', '.join(self.families)}"
            )
        self.templates = {**DEFAULT_TEMPLATES, **_check_templates(templates or {})}
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.tokenizer, self.model = _load_causal_lm(model_path, self.device)

    def prompt(self, caption: str, family: str) -> str:
        """The instruction for perturbing ``caption`` in ``family``."""
        return self.templates[family].replace("{caption}", caption)

    def perturb(self, caption: str, key: int) -> Perturbation | None:
        """The LM's perturbation of ``caption`` for example ``key``, else the rules' in the same family, else
        None."""
        rng = _rng(self.seed, key)
        family = self.families[rng.integers(len(self.families))]
        prompt = self.prompt(caption, family)
        text = validate_output(caption, self._generate(prompt, int(rng.integers(2**31))), prompt)
        if text is not None:
            return Perturbation(text, family, f"llm: {_word_diff(caption, text)}")
        rules = self.fallback.perturb(caption, key, family=family)
        if rules is None:
            return None
        return Perturbation(rules.text, family, f"fallback: {rules.rule}")

    @torch.no_grad()
    def _generate(self, prompt: str, seed: int) -> str:
        """The model's sampled answer to ``prompt`` (new tokens only, special tokens dropped)."""
        if self.tokenizer.chat_template is not None:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.tokenizer(
                text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False
            )
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        inputs = inputs.to(self.device)
        # tokenizers of causal LMs often have no padding token; one prompt needs none, generate wants an id
        pad = (
            self.tokenizer.eos_token_id
            if self.tokenizer.pad_token_id is None
            else self.tokenizer.pad_token_id
        )
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
            )  # (1, prompt + new)
        new = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def _check_templates(templates: dict[str, str]) -> dict[str, str]:
    for family, template in templates.items():
        if family not in FAMILIES:
            raise UserError(f"prompt template for unknown family {family!r}; accepted: {', '.join(FAMILIES)}")
        if "{caption}" not in template:
            raise UserError(f"prompt template for {family} must contain {{caption}}, got {template!r}")
    return templates


def _load_causal_lm(model_path: str, device: torch.device):
    expected = "a local transformers causal LM folder with config.json, its weights and tokenizer files"
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UserError(f"LLM perturber model {model_path!r} has no config.json; expected {expected}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LLM perturber model {model_path!r} cannot be loaded ({reason}); expected {expected}"
        ) from err
    return tokenizer, model.to(device).eval()


# ------------------------------------------------------------------------------------------------- batches


def perturb_all(
    captions: Sequence[str], perturber: Perturber, *, where: Sequence[str] | None = None
) -> list[Perturbation | None]:
    """Each caption's perturbation, its key its position in ``captions``; None where nothing applies.

    ``where``: each caption's location ("train.parquet row 7: column caption"), named when a caption is not a
    non-empty string."""
    if where is not None and len(where) != len(captions):
        raise ValueError(f"where names {len(where)} locations for {len(captions)} captions")
    results = []
    for key, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            place = where[key] if where is not None else f"caption {key}"
            raise UserError(f"{place}: a caption must be a non-empty string, got {caption!r}")
        results.append(perturber.perturb(caption, key))
    return results
