"""The documentation: the site builds with ``mkdocs build --strict`` (every link and anchor
resolves), and every ``flmnist`` command line in README.md and docs/*.md still composes a
valid config, so a renamed setting, a removed option or preset fails here naming the file
and line (test id ``docs/resume.md:11``).

The command lines are those in code blocks (indented or fenced; ``$ `` prompts, ``VAR=value``
prefixes, ``# comments`` and ``\\`` continuations as a shell reads them) and the inline code
spans that start with ``flmnist`` and an argument (``flmnist experiment=seed003``). Each is
checked with the command's own pre-flight, ``flmnist.launch.cli.hydra_arguments``: the same
composition and validation ``flmnist`` runs before Hydra and Flower start, each sweep job
composed (``-m``), and a resume through the real resume checks against a stand-in run (see
``resume_args``). ``flmnist ... --cfg job`` is not used: it composes and checks the settings
(not the sweep, resume and launch checks of ``hydra_arguments``) and prints. Nothing trains and MNIST is not
read (``ensure_mnist`` is stubbed: the lines' configs are checked, not the data).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flmnist.config.compose import check_group_overrides, compose_config, override_key
from flmnist.config.help import help_text, version_text
from flmnist.core.errors import ConfigError
from flmnist.core.run_files import CHECKPOINT, CHECKPOINT_INFO
from flmnist.launch import cli

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Lines that cannot be checked here, keyed by their text as written, each with the reason.
# Keep it short: a line that needs setting up gets a setup (SETUPS), not an entry here.
ALLOWED: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Finding the command lines


@dataclass(frozen=True)
class DocCommand:
    path: str                 # relative to the repository root
    line: int                 # where the command starts (1-based)
    text: str                 # as written (a continued or wrapped one joined into one line)
    args: tuple[str, ...]     # the arguments after the program, comments and "..." dropped
    error: str = ""           # why the line cannot be split as a shell would (then args is empty)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)")
LIST_ITEM = re.compile(r"^( *)([-*+]|\d+[.)])( +)(?=\S)")
# A shell line running flmnist: an optional "$ " prompt and VAR=value prefixes, then flmnist
# or a path ending in it (.venv/bin/flmnist).
IN_CODE = re.compile(r"^(?:\$\s+)?(?:[A-Za-z_]\w*=\S*\s+)*(?:\S*/)?flmnist(?:\s|$)")
# Inline: `flmnist ARG ...`; a bare `flmnist` is the command's name, `flmnist: ...` its output.
IN_SPAN = re.compile(r"^flmnist\s+\S")
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
ENV = re.compile(r"^[A-Za-z_]\w*=")


def split_markdown(text: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """The code lines of a Markdown text as (line number, line without the block's indent, the
    fence's language: "" for an indented block), and the text's lines with code lines blanked
    (line numbers kept). Indented blocks follow a blank line and are indented 4 columns more
    than the list item they are in, if any."""
    code: list[tuple[int, str, str]] = []
    prose: list[str] = []
    fence = lang = None
    fence_indent = 0
    prev_blank, in_block, list_content = True, False, 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.expandtabs(4)
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence = None
            else:
                code.append((number, line[min(fence_indent, len(line) - len(line.lstrip(" "))):], lang))
            prose.append("")
            prev_blank = False
            continue
        m = FENCE.match(line)
        if m:
            fence, fence_indent, lang = m.group(2), len(m.group(1)), m.group(3)
            prose.append("")
            in_block = False
            continue
        if not stripped:
            prose.append("")
            prev_blank = True
            continue
        indent = len(line) - len(line.lstrip(" "))
        need = list_content + 4
        if indent >= need and (prev_blank or in_block):
            in_block = True
            code.append((number, line[need:], ""))
            prose.append("")
        else:
            in_block = False
            item = LIST_ITEM.match(line)
            if item:
                list_content = len(item.group(0))
            elif indent == 0 and prev_blank:
                list_content = 0
            prose.append(line)
        prev_blank = False
    return code, prose


def strip_comment(line: str) -> str:
    """The line without its shell comment: a ``#`` starting a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_args(text: str) -> tuple[tuple[str, ...], str]:
    """The arguments after the program, as a shell splits them (a prompt, VAR=value prefixes
    and ``...`` words dropped), and an error if it cannot split them."""
    try:
        words = shlex.split(strip_comment(text.strip().removeprefix("$").strip()))
    except ValueError as err:
        return (), f"cannot be split as a shell would ({err})"
    while words and ENV.match(words[0]):
        words.pop(0)
    return tuple(w for w in words[1:] if w != "..."), ""


def commands_in(text: str, path: str) -> list[DocCommand]:
    """Every flmnist command line of a Markdown text, in order of their lines."""
    code, prose = split_markdown(text)
    found: list[DocCommand] = []
    i = 0
    while i < len(code):
        number, line, _ = code[i]
        if IN_CODE.match(line.strip()):
            joined = line.strip()
            while joined.endswith("\\") and i + 1 < len(code) and code[i + 1][0] == code[i][0] + 1:
                i += 1
                joined = joined[:-1].rstrip() + " " + code[i][1].strip()
            found.append(DocCommand(path, number, joined, *shell_args(joined)))
        i += 1
    start = 0
    paragraphs = []  # (first line number, text) of each run of prose lines
    for number, line in enumerate([*prose, ""], 1):
        if not line.strip():
            if start:
                paragraphs.append((start, "\n".join(prose[start - 1:number - 1])))
            start = 0
        elif not start:
            start = number
    for first, paragraph in paragraphs:
        for m in SPAN.finditer(paragraph):
            span = " ".join(m.group(1).split())
            if IN_SPAN.match(span):
                number = first + paragraph.count("\n", 0, m.start())
                found.append(DocCommand(path, number, span, *shell_args(span)))
    return sorted(found, key=lambda c: c.line)


def doc_commands() -> list[DocCommand]:
    return [c for f in DOC_FILES for c in commands_in(f.read_text(), str(f.relative_to(ROOT)))]


COMMANDS = doc_commands()


# ---------------------------------------------------------------------------------------------
# Checking one


def stand_in_run(run_dir: Path, overrides: list[str]) -> None:
    """A flmnist run directory stopped after round 1: its config.yaml (``overrides`` composed),
    a checkpoint file and checkpoint.json, which is all a resume's checks read (the checkpoint
    itself is loaded only by the ServerApp)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(overrides)))
    (run_dir / CHECKPOINT).write_bytes(b"")
    (run_dir / CHECKPOINT_INFO).write_text(json.dumps({"round": 1}))


def resume_args(args: list[str], workdir: Path) -> list[str]:
    """The arguments with a stand-in for the run a ``resume=`` names, so that the real resume
    checks run: the other overrides must be ones a resume accepts (the run's length, where it
    runs) and must extend the run, as ``flmnist resume=...`` checks them. The stand-in is a
    default run stopped after round 1 (FedBuff when the line sets ``async_loop.*``; private, with a
    budget of 8, when it sets ``privacy.*``), made at the
    line's own relative path (``outputs/DATE/TIME_NAME``) or, for ``latest``, under
    ``outputs/`` (the working directory is ``workdir``); a placeholder that is no such path
    (``resume=...``, an absolute path) is replaced by the stand-in's path."""
    [resume] = [a for a in args if override_key(a) == "resume"]
    value = resume.partition("=")[2].strip("'\"")
    run = ["strategy=fedbuff"] if any(override_key(a).startswith("async_loop.") for a in args) else []
    if any(override_key(a).startswith("privacy.") for a in args):  # a private run, stopped at its budget
        run += ["privacy=central", "privacy.max_epsilon=8"]
    if value == "latest":
        stand_in_run(workdir / "outputs" / "2026-01-01" / "00-00-00_stand_in", run)
        return args
    path = Path(value)
    if value and not path.is_absolute() and ".." not in path.parts and not value.startswith("~"):
        stand_in_run(workdir / path, run)
        return args
    stand_in_run(workdir / "outputs" / "stand_in", run)
    return [a if a != resume else "resume=outputs/stand_in" for a in args]


def toy_strategy_setup(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md's ``flmnist strategy=toy`` after the page's steps: its YAML saved as
    conf/strategy/toy.yaml (in a copy of conf/) and its class at flmnist.strategies.toy (the
    class is tests/toy_strategy.py)."""
    import toy_strategy

    code, _ = split_markdown((ROOT / "docs" / "extending.md").read_text())
    yaml = "\n".join(line for _, line, lang in code if lang == "yaml")
    assert "_target_: flmnist.strategies.toy.ToyStrategy" in yaml, "docs/extending.md lost its toy YAML"
    conf = workdir / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "strategy" / "toy.yaml").write_text(yaml + "\n")
    monkeypatch.setenv("FLMNIST_CONF_DIR", str(conf))
    monkeypatch.setitem(sys.modules, "flmnist.strategies.toy", toy_strategy)


# An override whose line presupposes steps the page describes -> those steps.
SETUPS = {"strategy=toy": toy_strategy_setup}
HELP = ("--help", "-h")


def check(command: DocCommand, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raise (ConfigError, AssertionError) if ``flmnist`` would refuse the line before starting."""
    args = list(command.args)
    if any(a in HELP for a in args):
        rest = [a for a in args if a not in HELP]
        check_group_overrides(rest)
        text = help_text(rest)
        assert "Unknown" not in text, text
        return
    if "--version" in args:
        assert version_text().startswith("flmnist 0.") and "Flower 1.41" in version_text(), version_text()
        return
    flags = [a for a in args if a.startswith("-") and a not in cli.MULTIRUN]
    assert not flags, f"flags tests/test_docs.py does not check: {flags} (teach it, or allow-list the line)"
    for override, setup in SETUPS.items():
        if override in args:
            setup(workdir, monkeypatch)
    if any(override_key(a) == "resume" for a in args):
        args = resume_args(args, workdir)
    cli.hydra_arguments(args)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory, MNIST not looked at, and a fresh record of resumes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "ensure_mnist", lambda root, download: None)
    monkeypatch.setattr(cli, "_resumed", {})
    monkeypatch.delenv("FLMNIST_CONF_DIR", raising=False)
    return tmp_path


def command_ids(commands: list[DocCommand]) -> list[str]:
    """``path:line``; a second command on one line gets ``path:line:2``."""
    ids: list[str] = []
    for c in commands:
        n = sum(1 for other in ids if other == c.id or other.startswith(c.id + ":"))
        ids.append(c.id if n == 0 else f"{c.id}:{n + 1}")
    return ids


@pytest.mark.parametrize("command", COMMANDS, ids=command_ids(COMMANDS))
def test_every_command_line_in_the_docs_is_accepted(command, workdir, monkeypatch):
    if command.text in ALLOWED:
        return  # listed with its reason in ALLOWED (test_the_allow_list_is_small_and_current)
    where = f"{command.path}:{command.line}: `{command.text}`"
    assert not command.error, f"{where}: {command.error}"
    try:
        check(command, workdir, monkeypatch)
    except Exception as err:  # noqa: BLE001 - the message is the point
        pytest.fail(f"{where} is refused: {type(err).__name__}: {err}", pytrace=False)


def test_the_allow_list_is_small_and_current():
    texts = {c.text for c in COMMANDS}
    assert len(ALLOWED) <= 3, "too many unchecked doc lines: check them instead"
    assert not set(ALLOWED) - texts, f"allow-listed lines no longer in the docs: {set(ALLOWED) - texts}"


def test_the_docs_command_lines_are_found():
    """The parser finds the README's examples and the pages' (a parser gone blind passes nothing)."""
    ids = {c.id.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/async.md", "docs/resume.md", "docs/extending.md", "docs/scenarios.md"} <= ids
    readme = [c.args for c in COMMANDS if c.path == "README.md"]
    assert ("-m", "strategy=fedavg,fedprox", "model=logreg", "num_rounds=1") in readme
    assert () in readme  # FLMNIST_DATA_DIR=/path/to/mnist .venv/bin/flmnist
    assert len(COMMANDS) >= 20


def test_a_stale_line_fails_naming_the_setting(workdir, monkeypatch):
    """What the parametrized test catches: an unknown key, a bad value, an unknown preset, a
    resume override that would change the run."""
    for text, says in [("flmnist strategy=fedprox client.learning_rate=0.1", "client.learning_rate"),
                       ("flmnist num_rounds=0", "num_rounds"),
                       ("flmnist experiment=seed999", "experiment"),
                       ("flmnist -m strategy=fedavg,fedprocs", "fedprocs"),
                       ("flmnist resume=outputs/DATE/TIME_NAME strategy=fedprox", "strategy=fedprox"),
                       ("flmnist --help strategy=fedprocs", "fedprocs")]:
        command = commands_in(f"    {text}\n", "sample.md")[0]
        with pytest.raises(ConfigError, match=re.escape(says)):
            check(command, workdir, monkeypatch)
        shutil.rmtree(workdir / "outputs", ignore_errors=True)


SAMPLE = """\
# Title

Run `flmnist experiment=seed002 num_rounds=5`; it prints `flmnist: error: ...` if not; `flmnist` is the command.

    $ flmnist strategy=fedprox \\
        partition=dirichlet   # a comment
    FLMNIST_DATA_DIR=/x .venv/bin/flmnist ...
    flwr run . --stream

```bash
flmnist -m strategy=fedavg,fedprox 'eval.rounds=[2]' name=a#b # a sweep
```

- a list item
    flmnist in a list item's text is not code

A span over
two lines: `flmnist --help
strategy=fedprox`, and `flmnist 'unclosed`.
"""


def test_the_parser_on_a_sample():
    found = [(c.line, c.args, c.error) for c in commands_in(SAMPLE, "sample.md")]
    assert found == [
        (3, ("experiment=seed002", "num_rounds=5"), ""),
        (5, ("strategy=fedprox", "partition=dirichlet"), ""),
        (7, (), ""),
        (11, ("-m", "strategy=fedavg,fedprox", "eval.rounds=[2]", "name=a#b"), ""),
        (18, ("--help", "strategy=fedprox"), ""),
        (19, (), "cannot be split as a shell would (No closing quotation)"),
    ]
    assert commands_in(SAMPLE, "sample.md")[1].text == "$ flmnist strategy=fedprox partition=dirichlet   # a comment"
    code, _ = split_markdown("Text\n\n```yaml\na:\n  b: 1  # kept as written\n```\n")
    assert code == [(4, "a:", "yaml"), (5, "  b: 1  # kept as written", "yaml")]
    assert command_ids(commands_in("`flmnist seed=1` or `flmnist seed=2`\n", "x.md")) == ["x.md:1", "x.md:1:2"]


def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: every page in the nav, every link and anchor resolving."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert "No module named mkdocs" not in out, "mkdocs-material is in the dev extra: pip install -e '.[dev]'"
    assert proc.returncode == 0, out[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    assert all((tmp_path / "site" / page / "index.html").is_file() for page in pages), out[-2000:]
