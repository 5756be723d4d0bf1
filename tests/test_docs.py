"""The documentation cannot drift from the code.

``docs/rules.md``: every file, rule and pattern key, every registered action with each of
its parameters and every registered check with each of its parameters has its section;
every ``yaml`` block loads with :func:`fxrewrite.load_rules` (``yaml fragment`` blocks are
skipped, ``yaml invalid`` blocks must fail with exactly the message of the ``text`` block
after them); every ``pycon`` block runs and prints what it shows (the blocks form one
doctest, in order).

``docs/architecture.md``: its ``pycon`` examples (a new action, check and block) run and print
what they show, in a scoped registry; its links resolve.

``docs/cli.md`` is what ``scripts/gen_cli_docs.py`` generates from the argparse parsers.
"""
from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxrewrite
from fxrewrite import RuleFileError, load_rules
from fxrewrite.rule_file import FILE_KEYS, PATTERN_KEYS, RULE_KEYS

ROOT = Path(__file__).resolve().parents[1]
RULES_MD = ROOT / "docs" / "rules.md"
ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"
CLI_MD = ROOT / "docs" / "cli.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, content, line) of every fenced code block."""
    return [(m[1].strip(), m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a full heading line) up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"docs/rules.md has no heading {heading!r}"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])
                and not _in_fence(lines, i)), len(lines))
    return "\n".join(lines[start:end])


def _in_fence(lines: list[str], index: int) -> bool:
    return sum(1 for line in lines[:index] if line.startswith("```")) % 2 == 1


@pytest.fixture(scope="module")
def doc() -> str:
    return RULES_MD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def registered() -> dict:
    """What the code registers: fxrewrite and every installed plug-in, in a fresh interpreter
    (tests register actions of their own in this one)."""
    code = """if True:
        import inspect, json
        import fxrewrite
        from fxrewrite import registry
        registry.load_all_plugins()
        actions = {n: sorted(registry.action(n).params or {}) for n in registry.action_names()}
        checks = {n: [p for p in list(inspect.signature(registry.check(n).fn).parameters)[2:]]
                  for n in registry.check_names()}
        print(json.dumps({"actions": actions, "checks": checks}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_file_rule_and_pattern_key_is_documented(doc):
    files, rules = section(doc, "## Rule files: top-level keys"), section(doc, "## Rules: keys of a rule")
    for key in FILE_KEYS:
        assert f"| `{key}` |" in files, f"top-level key {key!r} is not in the table of docs/rules.md"
    for key in RULE_KEYS:
        assert f"| `{key}` |" in rules, f"rule key {key!r} is not in the table of docs/rules.md"
    patterns = section(doc, "## Patterns")
    for key in PATTERN_KEYS:
        body = section(patterns, f"### `{key}`")
        assert f"{key}:" in body, f"the section of pattern key {key!r} has no example using it"
    documented = set(re.findall(r"^### `(\w+)`$", patterns, re.M))
    assert documented == PATTERN_KEYS


def test_every_action_and_each_parameter_is_documented(doc, registered):
    actions = section(doc, "## Actions")
    assert set(re.findall(r"^### `(\w+)`$", actions, re.M)) == set(registered["actions"])
    for name, params in registered["actions"].items():
        body = section(actions, f"### `{name}`")
        for param in params:
            assert f"| `{param}` |" in body, f"parameter {param!r} of action {name!r} is not documented"
        documented = set(re.findall(r"^\| `(\w+)` \|", body, re.M))
        assert documented == set(params), f"action {name!r}: documented {documented}, registered {params}"
        assert f"action: {name}" in body, f"the section of action {name!r} has no example rule"


def test_every_check_and_each_parameter_is_documented(doc, registered):
    checks = section(doc, "## Checks")
    assert set(re.findall(r"^### `(\w+)`$", checks, re.M)) == set(registered["checks"])
    for name, params in registered["checks"].items():
        body = section(checks, f"### `{name}`")
        for param in params:
            assert f"`{param}`" in body, f"parameter {param!r} of check {name!r} is not documented"
        assert f"- {name}" in body, f"the section of check {name!r} has no example rule"


def test_every_yaml_example_loads(doc):
    import fxrewrite.yolov9  # noqa: F401  (examples name its classes; plugins: [yolov9] loads it anyway)

    found = blocks(doc)
    loaded = 0
    for i, (info, content, line) in enumerate(found):
        words = info.split()
        if not words or words[0] != "yaml" or "fragment" in words:
            continue
        if "invalid" in words:
            expected = found[i + 1]
            assert expected[0] == "text", f"docs/rules.md:{line}: a 'yaml invalid' block must be followed by a 'text' block"
            with pytest.raises(RuleFileError) as info_:
                load_rules(content, name="my_rules.yaml")
            assert str(info_.value) == expected[1].rstrip("\n"), f"docs/rules.md:{line}: the documented errors drifted"
            continue
        try:
            load_rules(content, name=f"docs/rules.md:{line}")
        except RuleFileError as exc:
            pytest.fail(f"the yaml example at docs/rules.md:{line} does not load:\n{exc}")
        loaded += 1
    assert loaded >= 20


def test_every_yaml_fragment_is_valid_yaml(doc):
    import yaml

    for info, content, line in blocks(doc):
        if info.split()[:1] == ["yaml"]:
            assert yaml.safe_load(content) is not None, f"docs/rules.md:{line}"


def run_pycon(text: str, path: Path) -> doctest.TestResults:
    """Run the ``pycon`` blocks of a page as one doctest, in a scoped registry (what they register
    is gone after)."""
    examples = "\n".join(content for info, content, _ in blocks(text) if info == "pycon")
    test = doctest.DocTestParser().get_doctest(examples, {}, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with fxrewrite.registry.scoped():
        runner.run(test)
    return runner.summarize(verbose=False)


def test_the_python_examples_run_and_print_what_they_show(doc):
    failures, tries = run_pycon(doc, RULES_MD)
    assert failures == 0 and tries >= 30, f"{failures} of {tries} examples failed"
    assert fxrewrite.registry.action("relu_after") is None  # registered in the scope only


def test_architecture_examples_run_and_print_what_they_show():
    from fxrewrite.yolov9 import catalogue

    with catalogue.scoped():  # the block example registers "Gate" in the plug-in's block catalogue
        failures, tries = run_pycon(ARCHITECTURE_MD.read_text(encoding="utf-8"), ARCHITECTURE_MD)
    assert failures == 0 and tries >= 15, f"{failures} of {tries} examples failed"
    assert catalogue.block("Gate") is None and "models.common.Gate" not in catalogue.official_aliases()


# -- docs/cli.md ------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_the_generated_reference():
    generated = _generator().generate()
    assert CLI_MD.read_text(encoding="utf-8") == generated, \
        "docs/cli.md is stale: regenerate it with `python3 scripts/gen_cli_docs.py`"


def test_cli_md_documents_every_command_and_option():
    from fxrewrite.cli import build_parser

    text = CLI_MD.read_text(encoding="utf-8")
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(commands.choices) >= {"demo", "rules", "convert", "draw", "export"}
    for name, sub in commands.choices.items():
        body = section(text, f"## `fxrewrite {name}`")
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or "-h" in action.option_strings:
                continue
            label = ", ".join(action.option_strings) if action.option_strings else action.metavar or action.dest
            assert f"`{label}" in body, f"fxrewrite {name}: {label} is not documented"


@pytest.mark.parametrize("page", [RULES_MD, ARCHITECTURE_MD], ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(((?:\.\./|\./)?[\w./-]+)(?:#[\w-]+)?\)", text):
        assert (page.parent / target).exists(), f"docs/{page.name} links to {target}, which does not exist"
    anchors = {re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
               for h in re.findall(r"^#{2,3} .*$", text, re.M)}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in anchors, f"docs/{page.name} links to #{anchor}, which is no heading"
    for target, anchor in re.findall(r"\]\(([\w.-]+\.md)#([\w-]+)\)", text):
        other = (page.parent / target).read_text(encoding="utf-8")
        headings = {re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
                    for h in re.findall(r"^#{2,3} .*$", other, re.M)}
        assert anchor in headings, f"docs/{page.name} links to {target}#{anchor}, which is no heading"
