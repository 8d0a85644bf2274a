"""The README and docs/ hold together: every relative link reaches a file (and, with #anchor, a
heading of it, by GitHub's anchor rules), every `frugal` command shown names a real command and
only flags it has, and the Python shown imports names that exist."""
import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from frugal_rlhf.cli import COMMANDS, command_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def blocks(text: str):
    """(in_code, line) for each line, fenced code blocks marked."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            yield True, line
        else:
            yield fenced, line


def anchor(heading: str) -> str:
    """GitHub's: the heading's text (inline code and links as their text), lowercased, every
    character but letters, digits, '_', '-' and spaces dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for code, line in blocks(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if code or not m:
            continue
        base = anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def test_anchor_follows_githubs_rules():
    assert anchor("`gold` (the demo's): a simulated human with a hidden preference") == \
        "gold-the-demos-a-simulated-human-with-a-hidden-preference"
    assert anchor("With the gold judge (issue 18): a gain beyond noise on every seed") == \
        "with-the-gold-judge-issue-18-a-gain-beyond-noise-on-every-seed"
    assert anchor("Trackers, GGUF and model_cards") == "trackers-gguf-and-model_cards"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for code, line in blocks(page.read_text()):
        if code:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                broken.append(f"{target}: no heading #{frag} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def commands_shown(text: str):
    """Each `frugal ...` command line: in code blocks (continuations joined, comments cut) and
    in inline code spans."""
    lines, joined = [], ""
    for code, line in blocks(text):
        if code and not FENCE.match(line.lstrip()):
            joined += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                lines.append(joined)
                joined = ""
        elif not code:
            lines += re.findall(r"`(frugal [^`]+)`", line)
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose, not a command
            continue
        for i, word in enumerate(words):
            if word == "frugal" or word.endswith("/bin/frugal"):
                yield line.strip(), words[i + 1:]
                break


def placeholder(word: str) -> bool:
    return bool(re.search(r"[A-Z<|.\[]", word))  # frugal COMMAND, frugal <cmd>, frugal sft|rm


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "commands.md"], ids=lambda p: p.name)
def test_commands_shown_have_those_flags(page):
    wrong = []
    for line, words in commands_shown(page.read_text()):
        words = [w for w in words if w not in ("-v", "--verbose")]
        if not words or placeholder(words[0]):
            continue
        if words[0] not in COMMANDS:
            wrong.append(f"{line!r}: no command {words[0]!r}")
            continue
        flags = {s for a in command_parser(words[0])._actions for s in a.option_strings}
        for word in words[1:]:
            flag = word.strip("[]").split("=")[0]
            if flag.startswith("--") and flag != "--" and flag not in flags:
                wrong.append(f"{line!r}: frugal {words[0]} has no {flag}")
    assert not wrong, f"{page.relative_to(ROOT)}: " + "; ".join(wrong)


def python_blocks(text: str):
    block, inside = [], None
    for line in text.splitlines():
        if inside is None and re.match(r"^```python\s*$", line):
            inside, block = True, []
        elif inside and line.startswith("```"):
            yield "\n".join(block)
            inside = None
        elif inside:
            block.append(line)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_shown_imports_what_exists(page):
    missing = []
    for source in python_blocks(page.read_text()):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("frugal_rlhf"):
                module = importlib.import_module(node.module)
                missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"
