"""The config snippets of README.md and docs/*.md load with the project's own loader, and the docs offer exactly
the loss names the config and the preference recipe accept.

What counts as a snippet, and how each is checked:

- A fenced ``yaml`` block is partial: the keys to change in a copy of its recipe's base config,
  ``configs/quickstart.yaml`` (``recipe: preference``, the default) or ``configs/flow_rwr_video_toy.yaml``
  (``recipe: rwr``; see ``BASES``). It is merged onto that base, the block's values winning, and the result
  is loaded with ``load_config``.
- An inline code span made only of ``key.sub=value`` items, or of one ``key.sub: value``, whose first key is a
  config key (`loss.name: dpo`, `toy.control=false`), is a set of overrides on its recipe's base, loaded with
  ``load_config`` as a command line would be.
- A command ``mmalign train|eval|config FILE key=value ...`` (in a ``bash`` block, continuation lines joined,
  or in an inline code span) is run as ``mmalign config FILE key=value ...``, which resolves the same config,
  and must exit with 0. Commands whose FILE is a placeholder in capitals (CONFIG, FILE) are not run; options
  (``--final ...``) and ``...`` are dropped.
- Placeholders inside a snippet: a value that is one capital letter (N, K) stands for a count and is tried
  as 2; an absolute path (/models/sd15, /data/...) stands for the reader's own file or folder and is moved
  under a temporary folder, where it is created (as a folder, which every path key accepts).
- A partial snippet (yaml block or inline overrides) that gives no ``data.path`` trains on the reader's own
  data too: a temporary folder stands in for it. The bases' own ``data.path`` is one the toy world builds
  for its own format only, and the bases themselves are checked as they are, by the documented commands.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import pytest
from omegaconf import OmegaConf

from mmalign import cli
from mmalign.config import SCHEMAS, load_config
from mmalign.losses import LOSSES, names_for
from mmalign.recipes import preference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [
    "README.md",
    *sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")),
]
BASES = {
    "preference": "configs/quickstart.yaml",
    "rwr": "configs/flow_rwr_video_toy.yaml",
    "tpo": "configs/tdpo_toy.yaml",
    "kto": "configs/kto_toy.yaml",
    "branch_rl": "configs/b2_diffurl_toy.yaml",
    "latent_reward": "configs/latent_reward_video_toy.yaml",
    "guide": "configs/guide_video_toy.yaml",
}
CONFIG_KEYS = {f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema)}
KEY = r"[a-z_]+(?:\.[a-z_0-9]+)*"
COMMANDS = ("train", "eval", "config", "guide")


@dataclasses.dataclass
class Snippet:
    where: str  # file:line
    kind: str  # yaml, overrides or command
    text: str


def fenced_blocks(text: str):
    """(language, first line number of the body, body) of every fenced block; the text outside them, with
    each block's lines blanked so that line numbers stay right."""
    blocks, outside, lines = [], [], text.split("\n")
    language, start, body = None, 0, []
    for number, line in enumerate(lines, start=1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and language is None:
            language, start, body = fence.group(1), number + 1, []
            outside.append("")
        elif fence:
            blocks.append((language, start, "\n".join(body)))
            language = None
            outside.append("")
        elif language is not None:
            body.append(line)
            outside.append("")
        else:
            outside.append(line)
    return blocks, "\n".join(outside)


def commands_in(text: str) -> list[list[str]]:
    """The arguments after ``mmalign`` of each mmalign command in shell text (``&&`` / ``;`` / ``|`` split
    commands, ``\\`` continues a line, ``#`` starts a comment)."""
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, current = [], []
    for token in [*lexer, ";"]:
        if set(token) <= set("&;|()<>"):
            if "mmalign" in current:
                found.append(current[current.index("mmalign") + 1 :])
            current = []
        else:
            current.append(token)
    return found


def is_override_span(span: str) -> bool:
    items = shlex.split(span)
    return bool(items) and all(re.fullmatch(rf"({KEY})=.*", item, re.S) for item in items)


def snippets() -> list[Snippet]:
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            blocks, outside = fenced_blocks(f.read())
        for language, line, body in blocks:
            if language == "yaml":
                found.append(Snippet(f"{doc}:{line}", "yaml", body))
            elif language in ("bash", "sh", "shell"):
                for number, chunk in enumerate(re.split(r"(?<!\\)\n", body), start=line):
                    if "mmalign" in chunk:
                        found.append(Snippet(f"{doc}:{number}", "command", chunk))
        for match in re.finditer(r"`([^`]+)`", outside):
            where = f"{doc}:{outside.count(chr(10), 0, match.start()) + 1}"
            span = " ".join(match.group(1).split())
            single = re.fullmatch(rf"({KEY}): (.+)", span)
            if single and single.group(1).split(".")[0] in CONFIG_KEYS:
                found.append(Snippet(where, "overrides", f"{single.group(1)}={single.group(2)}"))
            elif is_override_span(span) and re.split(r"[.=]", shlex.split(span)[0])[0] in CONFIG_KEYS:
                found.append(Snippet(where, "overrides", span))
            elif re.search(r"\bmmalign (train|eval|config)\b", span):
                found.append(Snippet(where, "command", span))
    return found


SNIPPETS = snippets()


def stand_in(value, tmp_path):
    """A placeholder value made concrete (see the module docstring); other values unchanged."""
    if isinstance(value, str) and re.fullmatch(r"[A-Z]", value):
        return 2
    if isinstance(value, str) and value.startswith("/"):
        path = os.path.join(str(tmp_path), "reader", value.lstrip("/"))
        os.makedirs(path, exist_ok=True)
        return path
    return value


def override_stand_in(item: str, tmp_path) -> str:
    key, value = item.split("=", 1)
    return f"{key}={stand_in(value, tmp_path)}"


def run_command(arguments: list[str], tmp_path, capsys) -> None:
    """``mmalign config`` on the file and overrides of a documented ``mmalign train|eval|config``."""
    command, file, *rest = arguments
    overrides = [item for item in rest if item != "..."]
    if "--final" in overrides:
        index = overrides.index("--final")
        del overrides[index : index + 2]
    assert all(is_override_span(item) for item in overrides), f"not key=value overrides: {overrides}"
    overrides = [override_stand_in(item, tmp_path) for item in overrides]
    code = cli.main(["config", file, *overrides])
    assert code == 0, f"mmalign {command} {file} {' '.join(overrides)}: {capsys.readouterr().err.strip()}"


def documented_commands(snippet: Snippet) -> list[list[str]]:
    """The mmalign train / eval / config commands of ``snippet`` that name a real config file."""
    return [
        args
        for args in commands_in(snippet.text)
        if args and args[0] in COMMANDS and len(args) > 1 and not args[1].isupper()
    ]


def runnable(snippet: Snippet) -> bool:
    return snippet.kind != "command" or bool(documented_commands(snippet))


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if runnable(s)], ids=lambda s: f"{s.kind}@{s.where}")
def test_documented_config_snippet_loads(snippet, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    if snippet.kind == "command":
        for arguments in documented_commands(snippet):
            run_command(arguments, tmp_path, capsys)
        return
    readers_data = stand_in("/data/readers-own", tmp_path)
    if snippet.kind == "overrides":
        overrides = [override_stand_in(item, tmp_path) for item in shlex.split(snippet.text)]
        given = dict(item.split("=", 1) for item in overrides)
        if has_data(recipe_of(given)):
            overrides.insert(0, f"data.path={given.get('data.path', readers_data)}")
        load_config(BASES[recipe_of(given)], overrides)
        return
    block = OmegaConf.to_container(OmegaConf.create(snippet.text))
    assert isinstance(block, dict), f"{snippet.where}: a yaml snippet must be a mapping of sections"
    block = concrete(block, tmp_path)
    if has_data(recipe_of(block)):
        block.setdefault("data", {}).setdefault("path", readers_data)
    base = OmegaConf.load(os.path.join(ROOT, BASES[recipe_of(block)]))
    path = tmp_path / "snippet.yaml"
    OmegaConf.save(OmegaConf.merge(base, block), path)
    load_config(str(path))


# the sections only one recipe's schema has (kto's section is also tpo's: TKTO)
OWN_SECTIONS = {
    "tpo": "tpo",
    "kto": "tpo",
    "rwr": "rwr",
    "rl": "branch_rl",
    "reward_model": "latent_reward",
    "guidance": "guide",
    "weights": "guide",
    "prompt": "guide",
}


def has_data(recipe: str) -> bool:
    """Whether the recipe reads training data (``mmalign guide`` samples a model and reads none)."""
    return any(f.name == "data" for f in dataclasses.fields(SCHEMAS[recipe]))


def recipe_of(keys: dict) -> str:
    """The recipe a snippet is for: its ``recipe`` key, else the recipe whose own section it sets, else
    preference."""
    if "recipe" in keys:
        return keys["recipe"]
    for key in keys:
        section = key.split(".")[0]
        if section in OWN_SECTIONS:
            return OWN_SECTIONS[section]
    return "preference"


def concrete(tree: dict, tmp_path) -> dict:
    return {
        key: concrete(value, tmp_path) if isinstance(value, dict) else stand_in(value, tmp_path)
        for key, value in tree.items()
    }


def test_the_snippet_finder_sees_every_kind():
    """The extraction above must find what the docs hold, or the test of each snippet would pass vacuously."""
    where = {(s.kind, s.where.split(":")[0]) for s in SNIPPETS}
    assert ("yaml", "docs/algorithms.md") in where
    assert ("command", "README.md") in where and ("command", "docs/quickstart.md") in where
    assert ("overrides", "docs/algorithms.md") in where and ("overrides", "README.md") in where
    commands = [args for s in SNIPPETS if s.kind == "command" for args in documented_commands(s)]
    assert len(commands) >= 6, commands
    # a command with several overrides, its continuation lines joined
    assert any(len(args) > 8 for args in commands)


def documented_loss_names(docs: list[str]) -> set[str]:
    """Every value the docs give ``loss.name``, in snippets of any kind."""
    names = set()
    for snippet in SNIPPETS:
        if snippet.where.split(":")[0] not in docs:
            continue
        names.update(re.findall(r"\bloss\.name[=:] *([a-z_0-9]+)", snippet.text))
        if snippet.kind == "yaml":
            loss = (OmegaConf.to_container(OmegaConf.create(snippet.text)).get("loss") or {}).get("name")
            names.update([loss] if loss else [])
    return names


def test_config_recipes_and_docs_accept_the_same_loss_names():
    trained = set()
    for recipe, schema in SCHEMAS.items():
        loss = getattr(schema(), "loss", None)  # the recipe's loss section, if it has one
        if loss is None:
            continue
        (name_field,) = [f for f in dataclasses.fields(loss) if f.name == "name"]
        assert tuple(name_field.metadata["choices"]) == names_for(recipe), recipe
        trained.update(names_for(recipe))
    assert tuple(names_for("preference")) == preference.OBJECTIVES
    assert {"dpo", "bco_pair", "sft"} <= set(preference.OBJECTIVES) and "kto" not in preference.OBJECTIVES
    assert {"dpo", "kto", "sft"} <= set(names_for("tpo")) and names_for("kto") == ("kto",)
    # docs/algorithms.md offers each name some recipe trains, and nothing else; no other page offers another
    assert documented_loss_names(["docs/algorithms.md"]) == trained
    assert documented_loss_names(DOCS) <= trained


@pytest.mark.parametrize("name", [name for name in LOSSES if name not in preference.OBJECTIVES])
def test_a_loss_of_another_recipe_is_refused_with_the_accepted_names(name, monkeypatch, capsys):
    """``mmalign config configs/quickstart.yaml loss.name=kto``: exit 2, one line naming the key, the value and
    the accepted names."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["config", BASES["preference"], f"loss.name={name}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    accepted = ", ".join(preference.OBJECTIVES)
    assert line == f"mmalign: error: `loss.name` must be one of {accepted}, got {name!r} (command line)"
