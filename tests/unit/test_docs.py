"""The documents say only what exists. In README.md, SECURITY.md and docs/*.md every relative
link points to a file (and to a heading there), and every `ganns-async COMMAND [SUBCOMMAND]
--option` written in code, inline or in a block, names a command whose --help lists that
option; an inline span that starts with a command (`db add-login NAME --role viewer`) counts
as one, and options written on their own (`--device auto`) must belong to some command.
Checked with typer's CliRunner on the real app, so a renamed command or option fails here
before a student types it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ganns_async.cli import app
from helpers import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
CHECKED = [REPO / "README.md", REPO / "SECURITY.md", *DOCS]

FENCE = re.compile(r"^( {0,3})(```+|~~~+)[^\n]*\n(.*?)^\1\2[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PROGRAM = re.compile(r"(?<![\w./-])ganns-async(?=\s)")
# Where a command line ends inside code: a shell operator, a subshell's end, a comment.
END = re.compile(r"\s(?:&&|\|\||\||;|#)\s|[;)`]|\s(?:&&|\|\|)$")


@dataclass(frozen=True)
class Mention:
    where: str  # file:line
    # The command, e.g. ("db", "add-student"); () is the program itself; None: options
    # written on their own (`--device auto`), which some command must have.
    path: tuple[str, ...] | None
    options: tuple[str, ...]  # every --option written after it
    root_options: tuple[str, ...]  # the program's own, written before the command (--debug)
    text: str


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def blank_fences(text: str) -> str:
    """``text`` with its fenced blocks blanked out in place: offsets and lines stay put."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def code_spans(text: str) -> Iterator[tuple[int, str, bool]]:
    """(offset, code, is_block) for every fenced block and every inline code span."""
    for m in FENCE.finditer(text):
        yield m.start(3), m.group(3), True
    # Inline spans outside the blocks (a span may wrap onto the next line, as in Markdown).
    # An error line quoted from the program is its output, not a command to type.
    for m in INLINE.finditer(blank_fences(text)):
        if not m.group(2).startswith("error: "):
            yield m.start(2), m.group(2), False


def _command_lines(code: str, is_block: bool) -> Iterator[tuple[int, str]]:
    """(offset in code, the words after `ganns-async` up to where that command line ends)."""
    if is_block:
        code = re.sub(r"\\\n", "  ", code)  # continued lines are one command
    else:
        code = code.replace("\n", " ")  # Markdown joins a wrapped span with a space
    for m in PROGRAM.finditer(code):
        tail = code[m.end():]
        stop = len(tail)
        if is_block:
            stop = min(stop, tail.find("\n") if "\n" in tail else stop)
        end = END.search(tail[:stop])
        yield m.start(), tail[: end.start() if end else stop]


def _words(line: str) -> list[str]:
    return [w.strip("'\"[]{}(),.") for w in line.split()]


def _subcommands(command: Any) -> dict[str, Any] | None:
    """A group's commands by name; None for a plain command. (Typer carries its own copy of
    click, so its classes are told apart by what they have.)"""
    return getattr(command, "commands", None)


def _parse(words: list[str]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The command path the words name, the --options after it and the program's options
    before it. A word that is not a command where one must be ends the path (the check
    reports it); a plain command's arguments (alice, pause) are skipped."""
    root = typer.main.get_command(app)
    group: Any = root
    path: list[str] = []
    options: list[str] = []
    root_options: list[str] = []
    takes_value = {opt for p in root.params if getattr(p, "is_flag", True) is False for opt in p.opts}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            if path:
                options.append(name)
            else:
                root_options.append(name)
                if name in takes_value and "=" not in word:
                    i += 1  # the option's value, not a command
        elif _subcommands(group) is not None and word:
            path.append(word)
            command = _subcommands(group).get(word)
            if command is None:
                break
            group = command
        i += 1
    return tuple(path), tuple(options), tuple(root_options)


def mentions_in(text: str, name: str) -> list[Mention]:
    """Every command line in ``text``'s code: after `ganns-async` in blocks and inline spans,
    and inline spans that start with a command (`db add-login NAME --role viewer`) or with
    an option (`--device auto`: it must be some command's, path None)."""
    found = []
    commands = set(_subcommands(typer.main.get_command(app)) or {})
    for offset, code, is_block in code_spans(text):
        lines = list(_command_lines(code, is_block))
        if not lines and not is_block:
            first = code.split()[0] if code.split() else ""
            if first in commands or first.startswith("--"):
                lines = [(0, " " + code.replace("\n", " "))]
        for at, line in lines:
            words = _words(line)
            if not any(words):
                continue  # the program's name alone: pip install ganns-async
            where = f"{name}:{_line_of(text, offset + at if is_block else offset)}"
            shown = " ".join(line.split())
            if words[0].startswith("--") and not PROGRAM.search(code):
                found.append(Mention(where, None, tuple(w.split("=", 1)[0] for w in words if w.startswith("--")),
                                     (), shown))
                continue
            command, options, root_options = _parse(words)
            found.append(Mention(where, command, options, root_options, "ganns-async " + shown))
    return found


def mentions(path: Path) -> list[Mention]:
    return mentions_in(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))


@cache
def every_option() -> frozenset[str]:
    """The long options of every command (and of the program itself), --help included."""
    found = {"--help"}
    todo = [typer.main.get_command(app)]
    while todo:
        command = todo.pop()
        for param in command.params:
            found.update(o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("--"))
        todo.extend((_subcommands(command) or {}).values())
    return frozenset(found)


@cache
def help_text(path: tuple[str, ...]) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="ganns-async", terminal_width=200)
    return result.exit_code, result.output


def problems(mention: Mention) -> list[str]:
    """What is wrong with one mention: an unknown command, or options its --help lacks."""
    if mention.path is None:
        return [f"{mention.where}: no command has {option} (in `{mention.text}`)"
                for option in mention.options if option not in every_option()]
    group: Any = typer.main.get_command(app)
    known: list[str] = []
    for word in mention.path:
        command = (_subcommands(group) or {}).get(word)
        if command is None:
            if _subcommands(group) is not None:
                return [f"{mention.where}: `ganns-async {' '.join([*known, word])}` is no command "
                        f"(in `{mention.text}`)"]
            break  # a plain command's arguments (alice, pause|resume|stop)
        known.append(word)
        group = command
    code, output = help_text(tuple(known))
    if code != 0:
        return [f"{mention.where}: `ganns-async {' '.join(known)} --help` exits {code}"]
    out = []
    for options, where, listed in ((mention.options, known, output), (mention.root_options, [], help_text(())[1])):
        for option in options:
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", listed):
                out.append(f"{mention.where}: `{' '.join(['ganns-async', *where])}` has no {option} (in `{mention.text}`)")
    return out


# --- links ------------------------------------------------------------------------------


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings(doc: Path) -> None:
    text = blank_fences(doc.read_text(encoding="utf-8"))
    broken = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http(s):, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        file = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc.relative_to(REPO)}:{_line_of(text, m.start())}"
        if not file.exists():
            broken.append(f"{where}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{where}: {target} (no such heading in {file.name})")
    assert not broken, "\n".join(broken)


def test_readme_lists_every_guide() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(readme)}
    assert DOCS, "no guides in docs/"
    missing = [str(d.relative_to(REPO)) for d in DOCS if d.resolve() not in linked]
    assert not missing, f"README.md's Guides list does not link {missing}"


# --- commands and options ---------------------------------------------------------------


@pytest.mark.parametrize("doc", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_and_option_written_exists(doc: Path) -> None:
    found = mentions(doc)
    wrong = [p for m in found for p in problems(m)]
    assert not wrong, "\n".join(wrong)


def test_the_guides_mention_commands() -> None:
    """The extraction finds what the guides say (an empty list would pass anything)."""
    by_doc = {d.name: mentions(d) for d in DOCS}
    students = {(m.path, o) for m in by_doc["students.md"] for o in m.options}
    assert {(("worker",), "--db"), (("worker",), "--data"), (("worker",), "--name")} <= students
    instructors = {m.path for m in by_doc["instructors.md"]}
    assert {("coordinator",), ("watch",), ("control",), ("db", "add-student")} <= instructors


def test_the_check_catches_what_does_not_exist() -> None:
    """Wrong commands and options, inline, wrapped and in blocks, with the program's options
    before the command, commands and options written on their own; the program's name
    alone, and an error line it prints, are no mention."""
    text = ("Run `ganns-async worker --db URL\n--no-such-flag` or `ganns-async --log-level DEBUG watch --db U`.\n"
            "It says `error: run 1 is now coordinated by another process: ganns-async stops`.\n"
            "Then `db add-login NAME --role viewer --bogus`, `--device auto`, `--lease-seconds 90\n--nor-this`"
            " and `sslmode=verify-full`.\n\n"
            "```bash\nganns-async db add-student alice --db \"$ADMIN\" \\\n  --nope | tail -n 1\n"
            "ganns-async teleport --db URL  # no such command\nganns-async db frobnicate --db URL\n"
            "python -m pip install ganns-async && ganns-async control pause --db URL --run 3\n"
            "ganns-async --debug --no-such demo --max-steps 3\n```\n")
    found = mentions_in(text, "x.md")
    assert [(m.path, m.options, m.root_options) for m in found] == [
        (("db", "add-student"), ("--db", "--nope"), ()),
        (("teleport",), (), ()),
        (("db", "frobnicate"), (), ()),
        (("control",), ("--db", "--run"), ()),
        (("demo",), ("--max-steps",), ("--debug", "--no-such")),
        (("worker",), ("--db", "--no-such-flag"), ()),
        (("watch",), ("--db",), ("--log-level",)),
        (("db", "add-login"), ("--role", "--bogus"), ()),
        (None, ("--device",), ()),
        (None, ("--lease-seconds", "--nor-this"), ()),
    ]
    reported = [p for m in found for p in problems(m)]
    assert len(reported) == 7, reported
    assert any("add-student` has no --nope" in p for p in reported)
    assert any("teleport` is no command" in p for p in reported)
    assert any("frobnicate` is no command" in p for p in reported)
    assert any("worker` has no --no-such-flag" in p for p in reported)
    assert any("`ganns-async` has no --no-such" in p for p in reported)  # before the command: the program's
    assert any("add-login` has no --bogus" in p for p in reported)
    assert any("no command has --nor-this" in p for p in reported)
