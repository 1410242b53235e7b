"""TPO's caption perturbations (arXiv 2509.25771): lexicon rules in four families, and a local causal LM whose
answers are validated and replaced by the rules when unusable."""

from __future__ import annotations

import difflib
import os
import re
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmalign.errors import UserError
from mmalign.pairs import tpo
from mmalign.pairs.tpo import (
    FAMILIES,
    LLMPerturber,
    Perturbation,
    RulePerturber,
    perturb_all,
    validate_output,
)
from mmalign.toy import moving, shapes, text

KEYS = range(40)
TOY_COLOURS = set(shapes.COLOURS)
COLOURS = TOY_COLOURS | {
    "black",
    "white",
    "grey",
    "brown",
    "orange",
    "purple",
    "pink",
    "gold",
    "silver",
    "beige",
}
COLOURS |= {"turquoise", "navy blue"}
NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
CAR = "a red car parked in front of a house on a sunny beach"
DOGS = "two dogs playing on a wooden table at night"


def changes(before: str, after: str) -> list[tuple[str, str]]:
    """The (old, new) word spans that differ between two captions."""
    a, b = before.split(), after.split()
    opcodes = difflib.SequenceMatcher(None, a, b).get_opcodes()
    return [(" ".join(a[i1:i2]), " ".join(b[j1:j2])) for tag, i1, i2, j1, j2 in opcodes if tag != "equal"]


def all_outputs(
    perturber: RulePerturber, caption: str, family: str | None = None, keys: range = KEYS
) -> list[Perturbation]:
    return [perturber.perturb(caption, key, family=family) for key in keys]


# ---------------------------------------------------------------------------------------------- the rules


def test_a_colour_becomes_a_different_colour_never_itself_or_a_synonym():
    rules = RulePerturber(["attributes"])
    for caption, synonyms in [(CAR, {"red"}), ("the gray cat on the grey mat", {"grey", "gray"})]:
        outputs = all_outputs(rules, caption)
        for output in outputs:
            assert output.family == "attributes"
            assert output.rule.startswith("colour: ")
            ((old, new),) = changes(caption, output.text)
            assert old in synonyms and new in COLOURS - synonyms, output
        assert len({output.text for output in outputs}) > 2  # several colours, not one fixed swap


def test_a_material_becomes_a_different_material():
    materials = {"metal", "glass", "plastic", "stone", "marble", "leather", "paper", "ceramic", "concrete"}
    materials |= {"brick", "wool", "rubber", "cardboard", "silk", "velvet"}
    outputs = all_outputs(RulePerturber(["attributes"]), DOGS)
    for output in outputs:
        assert changes(DOGS, output.text) == [("wooden", output.rule.split(" -> ")[1])]
        assert output.rule.startswith("material: wooden -> ") and output.rule.split(" -> ")[1] in materials
    assert len({output.text for output in outputs}) > 5


def test_content_swaps_objects_for_objects_of_their_kind_and_keeps_the_number():
    rules = RulePerturber(["content"])
    outputs = all_outputs(rules, DOGS)
    assert {output.rule.split(":")[0] for output in outputs} == {"count", "animal", "furniture"}
    for output in outputs:
        ((old, new),) = changes(DOGS, output.text)
        if output.rule.startswith("animal"):
            assert old == "dogs" and new.endswith("s") and new not in {"dogs", "puppies"}, output
        elif output.rule.startswith("furniture"):
            assert old == "table" and new in {
                "chair",
                "couch",
                "bed",
                "desk",
                "bench",
                "stool",
                "shelf",
                "cabinet",
            }
        else:
            assert (old, new) == ("two dogs", "one dog") or (old == "two" and new in NUMBERS - {"one", "two"})
    for output in all_outputs(rules, "a cat on a couch"):
        assert "sofa" not in output.text and output.text != "a cat on a couch"


def test_counts_change_and_the_counted_noun_agrees():
    rules = RulePerturber(["content"])
    counts = [
        o
        for caption in ("one dog", "2 cats", "three small brown dogs")
        for o in all_outputs(rules, caption, keys=range(200))
    ]
    counts = [output for output in counts if output.rule.startswith("count")]
    texts = {output.text for output in counts}
    assert texts & {"two dogs", "five dogs", "ten dogs"}  # one dog -> n dogs
    assert "1 cat" in texts and all(re.fullmatch(r"(1 cat|([2-9]|10) cats)", t) for t in texts if "cat" in t)
    assert "2 cats" not in texts
    brown = {f"{n} small brown dogs" for n in NUMBERS - {"one", "three"}} | {"one small brown dog"}
    assert {t for t in texts if "brown" in t} <= brown
    # articles are not counts, and "one" without a noun after it (a pronoun) is left alone
    for caption in ("a dog", "an apple on a plate", "the one on the right"):
        assert not any(output.rule.startswith("count") for output in all_outputs(RulePerturber(), caption))


@pytest.mark.parametrize(
    "caption, inverted",
    [
        ("a cat sitting under a table", "a cat sitting on top of a table"),
        ("a bird above a tree", "a bird below a tree"),
        ("a dog inside a box", "a dog outside a box"),
        ("a ball to the left of a box", "a ball to the right of a box"),
        ("a man walking towards the camera", "a man walking away from the camera"),
        (CAR, "a red car parked behind a house on a sunny beach"),
        ("a red circle moving up", "a red circle moving down"),
        ("a cat moving left to right", "a cat moving right to left"),
        ("a large red circle on the left", "a large red circle on the right"),
        ("a small blue square at the top", "a small blue square at the bottom"),
    ],
)
def test_relations_are_inverted(caption, inverted):
    output = RulePerturber(["relations"]).perturb(caption, 3)
    assert output.text == inverted and output.family == "relations"


def test_context_changes_the_setting_weather_or_time():
    rules = RulePerturber(["context"])
    assert {output.text for output in all_outputs(rules, DOGS)} == {
        "two dogs playing on a wooden table during the day"
    }
    weather = {"rainy", "snowy", "foggy", "cloudy", "stormy", "windy"}
    places = {"street", "mountain", "hill", "lake", "river", "farm", "moon", "grass", "rooftop", "sidewalk"}
    seen = set()
    for output in all_outputs(rules, CAR):
        ((old, new),) = changes(CAR, output.text)
        assert old in {"sunny", "beach"} and new in (weather if old == "sunny" else places), output
        seen.add(old)
    assert seen == {"sunny", "beach"}


def test_every_family_is_drawn_and_recorded():
    outputs = all_outputs(RulePerturber(), CAR)
    assert {output.family for output in outputs} == set(FAMILIES)
    for output in outputs:
        assert output.text != CAR and output.rule.count(" -> ") == 1


def test_a_perturbation_is_a_function_of_seed_key_and_caption_only():
    captions = [CAR, DOGS, "a large red circle on the left"] * 5
    forwards = [RulePerturber(seed=3).perturb(caption, key) for key, caption in enumerate(captions)]
    rules = RulePerturber(seed=3)
    backwards = [rules.perturb(captions[key], key) for key in reversed(range(len(captions)))][::-1]
    assert forwards == backwards
    assert len({output.text for output in all_outputs(RulePerturber(seed=3), CAR)}) > 5  # keys vary
    other_seed = [RulePerturber(seed=4).perturb(caption, key) for key, caption in enumerate(captions)]
    assert other_seed != forwards


def test_none_when_no_rule_of_the_families_applies():
    assert RulePerturber(["relations"]).perturb("abstract art", 0) is None
    assert RulePerturber().perturb("abstract art", 0) is None
    assert RulePerturber(["relations"]).perturb(DOGS, 0) is None
    assert RulePerturber(["context"]).perturb("a large red circle on the left", 0) is None


def test_an_unknown_family_names_itself_and_the_accepted_ones():
    with pytest.raises(UserError, match=r"'colour'.*") as error:
        RulePerturber(["content", "colour"])
    assert all(family in str(error.value) for family in FAMILIES)
    with pytest.raises(UserError, match="none"):
        RulePerturber([])


def test_replacements_keep_the_case_and_the_article_agrees():
    rules = RulePerturber()
    assert (
        rules.perturb("On the left, a red circle", 0, family="relations").text == "On the right, a red circle"
    )
    assert rules.perturb("A RED CIRCLE MOVING UP", 0, family="relations").text == "A RED CIRCLE MOVING DOWN"
    for output in all_outputs(rules, "Red car in front of a house", "attributes"):
        assert output.text[0].isupper() and output.text[1:].startswith(output.text.split()[0][1:])
    for output in all_outputs(rules, "An apple on a plate", "content"):
        article, word = output.text.split()[:2] if output.text.startswith("A") else ("", "")
        if article:
            assert article == ("An" if word[0] in "aeiou" else "A"), output.text


def check_toy(world, scene, family: str, new) -> None:
    """``new`` differs from ``scene`` in exactly the attribute ``family`` changes in that toy world."""
    changed = {name for name in vars(scene) if getattr(scene, name) != getattr(new, name)}
    if family == "content":
        assert changed == {"shape"}
    elif family == "attributes":
        assert changed in ({"colour"}, {"size"})
        assert new.colour in TOY_COLOURS
    elif world is shapes:
        assert changed == {"position"}
        inverse = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        assert new.position == inverse.get(scene.position, new.position) and new.position != "center"
    else:
        assert changed == {"direction"} and new.direction == moving.OPPOSITE[scene.direction]


@pytest.mark.parametrize("world", [shapes, moving], ids=["shapes", "moving"])
def test_every_toy_caption_stays_in_its_grammar_and_changes_the_intended_attribute(world):
    rules = RulePerturber()
    seen: dict[str, set[str]] = {family: set() for family in FAMILIES[:3]}
    for key, scene in enumerate(world.all_scenes()):
        caption = world.caption(scene)
        for family in FAMILIES[:3]:
            output = rules.perturb(caption, key, family=family)
            check_toy(world, scene, family, world.parse_caption(output.text))
            seen[family].add(output.rule.split(" -> ")[1])
        assert rules.perturb(caption, key, family="context") is None
    assert {"circle", "square", "triangle"} <= seen["content"]
    assert seen["attributes"] >= TOY_COLOURS
    if world is shapes:
        assert {"small", "large"} <= seen["attributes"]
        assert seen["relations"] == {"on the left", "on the right", "at the top", "at the bottom"}


# ------------------------------------------------------------------------------------------- validation

PROMPT = tpo.DEFAULT_TEMPLATES["attributes"].replace("{caption}", CAR)
BLUE = "a blue car parked in front of a house on a sunny beach"


@pytest.mark.parametrize(
    "candidate, cleaned",
    [
        (BLUE, BLUE),
        (f'Caption: "{BLUE}"', BLUE),
        (f"New caption:   {BLUE}\nThe colour is now blue.", BLUE),
        (f"Here is the new caption:\n'{BLUE}'", BLUE),
        ("  a  blue car parked in front\tof a house on a sunny beach  ", BLUE),
        ("", None),
        ("  \n\n ", None),
        ("Caption: ", None),
        ("A red car, parked in front of a house on a sunny beach!", None),  # the original again
        (PROMPT, None),  # the prompt echoed
        ("Change only that and keep every other word", None),  # a piece of the instruction
        (f"{BLUE}. Answer with the new caption only.", None),
        ("square left the dog red red on on a a night magenta house blue the car of", None),  # garbage
    ],
)
def test_validate_output(candidate, cleaned):
    assert validate_output(CAR, candidate, PROMPT) == cleaned


# --------------------------------------------------------------------------------------------------- LLM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama of width 32 with a word-level tokenizer of the prompts' words, saved and loaded back."""
    corpus = " ".join([*tpo.DEFAULT_TEMPLATES.values(), CAR, DOGS, *shapes.vocabulary()]).lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]", corpus)))
    tokenizer = text.word_tokenizer(words, max_length=512, lowercase=True, eos="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_garbage_from_the_lm_is_rejected_and_the_rules_take_over(tiny_lm):
    llm = LLMPerturber(tiny_lm, seed=0, max_new_tokens=16)
    rules = RulePerturber(seed=0)
    prompt = llm.prompt(CAR, "content")
    answer = llm._generate(prompt, 7)
    assert len(answer.split()) > 5 and validate_output(CAR, answer, prompt) is None
    families = set()
    for key in range(3):
        output = llm.perturb(CAR, key)
        assert output.rule.startswith("fallback: ")
        assert output == Perturbation(
            rules.perturb(CAR, key, family=output.family).text,
            output.family,
            "fallback: " + rules.perturb(CAR, key, family=output.family).rule,
        )
        families.add(output.family)
    assert len(families) > 1
    assert LLMPerturber(tiny_lm, ["relations"], max_new_tokens=16).perturb("abstract art", 0) is None


def test_the_lm_is_seeded_by_seed_and_key(tiny_lm):
    llm = LLMPerturber(tiny_lm, seed=0, max_new_tokens=16)
    prompt = llm.prompt(DOGS, "context")
    assert llm._generate(prompt, 1) == llm._generate(prompt, 1)
    assert llm._generate(prompt, 1) != llm._generate(prompt, 2)
    first = [llm.perturb(DOGS, key) for key in range(2)]
    torch.manual_seed(123)  # the global RNG does not matter
    assert [LLMPerturber(tiny_lm, seed=0, max_new_tokens=16).perturb(DOGS, key) for key in range(2)] == first


class FixedAnswer(LLMPerturber):
    """The real perturber with its generation call replaced by a fixed answer: validation and bookkeeping are
    what these tests check."""

    answer = ""

    def _generate(self, prompt: str, seed: int) -> str:
        return self.answer


def test_a_valid_lm_answer_is_kept_with_its_family_and_word_changes(tiny_lm):
    llm = FixedAnswer(tiny_lm, ["attributes"], seed=0)
    llm.answer = f'New caption: "{BLUE}"'
    assert llm.perturb(CAR, 5) == Perturbation(BLUE, "attributes", "llm: red -> blue")
    llm.answer = f"{CAR} at night"
    assert llm.perturb(CAR, 5).rule == "llm: + at night"
    llm.answer = llm.prompt(CAR, "attributes")
    assert llm.perturb(CAR, 5).rule.startswith("fallback: colour: red -> ")


def test_a_chat_template_wraps_the_prompt(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm, local_files_only=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    LlamaForCausalLM.from_pretrained(tiny_lm).save_pretrained(tmp_path)
    chat = LLMPerturber(str(tmp_path), seed=0, max_new_tokens=16)
    assert chat.tokenizer.chat_template is not None
    output = chat.perturb(CAR, 0)
    assert output.rule.startswith("fallback: ") and output == chat.perturb(CAR, 0)


def test_lm_setup_errors_name_the_problem(tiny_lm, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(UserError, match=r"no-such-model.*config\.json.*tokenizer"):
        LLMPerturber(missing)
    (tmp_path / "config-only").mkdir()
    shutil.copy(os.path.join(tiny_lm, "config.json"), tmp_path / "config-only")
    with pytest.raises(UserError, match=r"config-only.*cannot be loaded"):
        LLMPerturber(str(tmp_path / "config-only"))
    with pytest.raises(UserError, match="fallback rules lack the families context"):
        LLMPerturber(tiny_lm, fallback=RulePerturber(["content", "attributes", "relations"]))
    with pytest.raises(UserError, match="unknown family 'colour'"):
        LLMPerturber(tiny_lm, templates={"colour": "{caption}"})
    with pytest.raises(UserError, match=r"must contain \{caption\}"):
        LLMPerturber(tiny_lm, templates={"context": "Rewrite it."})


# ----------------------------------------------------------------------------------------------- batches


def test_perturb_all_keys_each_caption_by_its_position():
    rules = RulePerturber(seed=1)
    captions = [CAR, "abstract art", DOGS]
    assert perturb_all(captions, rules) == [rules.perturb(CAR, 0), None, rules.perturb(DOGS, 2)]
    with pytest.raises(UserError, match="train.jsonl line 2: a caption must be a non-empty string"):
        perturb_all([CAR, " "], rules, where=["train.jsonl line 1", "train.jsonl line 2"])
