"""``flmnist --help``: every group, option and setting, described by the comments in ``conf/``.

The YAML files are the one source: a setting's description is its end-of-line comment (or the
comment lines right above it), an option's description the first comment line of its file.
A test checks that every setting a user can write has one, so help cannot drift from ``conf/``.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from flmnist.config.compose import GROUPS, conf_dir, group_options, option_files
from flmnist.core.errors import ConfigError

# Keys that are not settings: Hydra's and the instantiation target.
SKIP = ("defaults", "hydra", "_target_")
LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


@dataclass(frozen=True)
class Setting:
    key: str          # dotted path, e.g. "async_loop.eval_every"
    default: str      # as written in the YAML ("" for a section)
    description: str  # "" if the file has none
    section: bool = False


def settings(path: Path, prefix: str = "") -> list[Setting]:
    """The settings of one YAML file, in file order, each with its default and description."""
    out: list[Setting] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing sections
    above: list[str] = []              # comment lines right above the next key
    skipping: int | None = None        # indent of a skipped block (defaults:, hydra:)
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("# @package"):
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = LINE.match(raw)
        if m is None:  # a list item or continuation
            above = []
            continue
        indent, key, value = len(m["indent"]), m["key"], m["value"].strip()
        if skipping is not None:
            if indent > skipping:
                continue
            skipping = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        comment = (m["comment"] or "").strip() or " ".join(above)
        above = []
        if key in SKIP:
            if not value:
                skipping = indent
            continue
        dotted = ".".join([*(k for _, k in stack), key])
        full = f"{prefix}.{dotted}" if prefix else dotted
        out.append(Setting(full, value, comment, section=not value))
        if not value:
            stack.append((indent, key))
    return out


def option_description(group: str, option: str) -> str:
    """The comment block at the top of ``conf/<group>/<option>.yaml``, as one paragraph."""
    block = []
    for line in (conf_dir() / group / f"{option}.yaml").read_text().splitlines():
        line = line.strip()
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").strip())
    return " ".join(block)


def headline(text: str, width: int = 80) -> str:
    """The first sentence of ``text``, cut to ``width`` characters."""
    cut = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", text, maxsplit=1)[0].rstrip(".")
    return cut if len(cut) <= width else cut[: width - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."  # at a word's end


def defaults() -> dict[str, str]:
    """The default option of each group (from ``conf/config.yaml``'s defaults list)."""
    found = {}
    for line in (conf_dir() / "config.yaml").read_text().splitlines():
        m = re.match(r"^\s*-\s*(\w+):\s*(\w+)", line)
        if m and m[1] in GROUPS:
            found[m[1]] = m[2]
    return found


def top_level_settings() -> list[Setting]:
    return settings(conf_dir() / "config.yaml")


def group_settings(group: str, option: str) -> list[Setting]:
    """An option's settings, as the user writes them (``strategy.proximal_mu``); an
    experiment's, and those of an option in Hydra's global package (``# @package _global_``,
    e.g. a model with its own client defaults), are written from the top (``client.lr``).
    The shared parts its defaults list pulls in (``_sampling``) come first."""
    path = conf_dir() / group / f"{option}.yaml"
    top = group == "experiment" or "# @package _global_" in path.read_text()
    return [s for part in option_files(group, option) for s in settings(part, "" if top else group)]


def known_descriptions() -> dict[str, str]:
    """Every described setting of the top level and of every group option, by dotted key."""
    found = {s.key: s.description for s in top_level_settings() if s.description}
    own: set[str] = set()  # keys described by their own group (client.momentum by client/, not model/logreg)
    for group in GROUPS:
        if group != "experiment":
            for option in group_options(group):
                for s in group_settings(group, option):
                    if s.description and s.key.startswith(f"{group}.") and s.key not in own:
                        found[s.key] = s.description
                        own.add(s.key)
                    elif s.description:
                        found.setdefault(s.key, s.description)
    return found


def described(items: list[Setting]) -> list[Setting]:
    """Settings without a comment of their own: an interpolation says where its value comes
    from, and a preset's key (an experiment sets keys defined elsewhere) takes that key's text."""
    known = None
    out = []
    for s in items:
        if not s.description and s.default.startswith("${"):
            s = Setting(s.key, s.default, f"from {s.default[2:-1]}", s.section)
        elif not s.description:
            known = known if known is not None else known_descriptions()
            s = Setting(s.key, s.default, known.get(s.key, ""), s.section)
        out.append(s)
    return out


def _wrap(text: str, indent: int, width: int = 100) -> str:
    return textwrap.fill(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _rows(items: list[Setting], indent: int = 2) -> list[str]:
    lines = []
    width = max((len(s.key) for s in items if not s.section), default=10) + 2
    depth = 0
    for s in items:
        if "." not in s.key and depth:  # back at the top level after a section
            lines.append("")
        depth = s.key.count(".")
        if s.section:
            lines.append(f"\n{' ' * indent}{s.key}: {s.description}".rstrip())
            continue
        head = f"{' ' * indent}{s.key.ljust(width)}= {s.default}"
        lines.append(head)
        if s.description:
            lines.append(_wrap(s.description, indent + 4))
    return lines


USAGE = """\
flmnist: federated MNIST on Flower. Trains a model across simulated nodes with `flwr run`
(or a real fleet of SuperNodes), with synchronous or asynchronous strategies, and writes
metrics, plots, models and a summary to a run directory.

Usage:
  flmnist [GROUP=OPTION ...] [KEY=VALUE ...]     one run, e.g. flmnist strategy=fedprox num_rounds=5
  flmnist -m KEY=A,B ...                         a sweep, ending with a comparison table
  flmnist resume=RUN_DIR|latest                  continue a run from its checkpoint
  flmnist --help [GROUP=OPTION ...]              this help; with options, their own settings
  flmnist --version                              flmnist's and Flower's versions
  flmnist [OVERRIDES ...] --cfg job              the composed config, its values checked (not data, GPUs
                                                 or a resume's checkpoint), not run
  flmnist --hydra-help                           Hydra's own help (--cfg, --info ...)

Runs go to outputs/DATE/TIME_NAME/ (sweeps: multirun/DATE/TIME_NAME/N_.../), NAME being name=
if set, else the experiment's name, else STRATEGY_SPLIT. A sweep of 4 jobs or more whose
ClientApps run in process runs two at a time (hydra.launcher.lanes=1: one after the other).
Exit codes: 0 finished, 1 the run
failed, 2 a bad setting (nothing ran), 3 finished degraded (its accuracy collapsed: collapse.*),
130 Ctrl-C, 129 SIGHUP, 143 SIGTERM.
"""


def help_text(overrides: list[str] | None = None) -> str:
    """The main help, or (with ``GROUP=OPTION`` overrides) those options' settings."""
    chosen = [o.split("=", 1) for o in overrides or [] if "=" in o]
    chosen = [(g.lstrip("+").removeprefix("override "), o) for g, o in chosen]
    picked = [(g, o) for g, o in chosen if g in GROUPS]
    if picked:
        lines = []
        for group, option in picked:
            if option not in group_options(group):  # as a run says it (cli: one line, exit 2)
                raise ConfigError(f"Unknown {group} '{option}'. Valid options for {group}: "
                                  f"{', '.join(group_options(group))}")
            lines.append(_wrap(f"{group}={option}: {option_description(group, option)}", 0))
            own = described(group_settings(group, option))
            lines += _rows(own) if own else ["  (no settings of its own)"]
            lines.append("")
        return "\n".join(lines)
    default = defaults()
    lines = [USAGE, "Groups (choose one option each; `flmnist --help GROUP=OPTION` shows its settings):"]
    for group in GROUPS:
        lines.append(f"\n  {group} (default: {default.get(group, 'none')})")
        for option in group_options(group):
            lines.append(f"    {option:<19}{headline(option_description(group, option))}")
    lines.append("\nSettings (KEY=VALUE; the value shown is the default):")
    lines += _rows(described(top_level_settings()))
    for group in GROUPS:  # a group with one option: its settings are always there to set
        if len(group_options(group)) == 1:
            option = group_options(group)[0]
            lines.append(f"\n  {group}: {headline(option_description(group, option))}")
            lines += _rows(described(group_settings(group, option)))
    return "\n".join(lines) + "\n"


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"flmnist {v('flmnist')} (Flower {v('flwr')}, PyTorch {v('torch')}, Hydra {v('hydra-core')})"
