"""MkDocs hook: the configuration reference page, generated from configs/ at every build.

Why a hook and not a committed page: a page written by a script goes stale the moment someone edits a
YAML comment and forgets to rerun the script; a page built from configs/ at `mkdocs build` time cannot.
`tests/test_docs_config_reference.py` calls `render()` directly and checks that every file under configs/
is on the page. The YAML files are read as text, line by line, because OmegaConf (and PyYAML) drop
comments, and the comments are the documentation.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PAGE = "configuration.md"

# `key: value  # comment` or `- item  # comment`; the value may be empty (a mapping follows)
KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.\-/@+]+):(?:\s+(?P<rest>.*))?$")
ITEM = re.compile(r"^(?P<indent>\s*)- (?P<rest>.*)$")


def _split_comment(text: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment); a `#` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def parse(text: str) -> tuple[str, list[list[str]]]:
    """A YAML file's text -> (its header comment, rows of [dotted key, value, comment])."""
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        if lines[i].startswith("#"):
            header.append(lines[i].lstrip("#").strip())
        i += 1
    rows: list[list[str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings we are inside
    pending: list[str] = []  # comment lines standing alone: they describe the next key
    last = None  # (indent, had an inline comment) of the last row: deeper comment lines right after continue it
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            last = None
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if rows and last and last[1] and indent > last[0]:
                rows[-1][2] = (rows[-1][2] + " " + stripped.lstrip("#").strip()).strip()
            else:
                pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line) or ITEM.match(line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent and not (ITEM.match(line) and stack[-1][0] == indent):
            stack.pop()
        rest, comment = _split_comment(match.group("rest") or "")
        if "key" in match.groupdict() and match.groupdict().get("key") is not None:
            path = ".".join([k for _, k in stack] + [match.group("key")])
            if not rest:
                stack.append((indent, match.group("key")))
        else:  # a list item: under the key above it
            path = ".".join(k for _, k in stack) + "[]"
        comment = " ".join(pending + ([comment] if comment else []))
        pending = []
        last = (indent, bool(comment))
        rows.append([path, rest, comment])
    return " ".join(header), rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _file_section(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    out = [f"### `{rel}`", ""]
    if path.suffix not in (".yaml", ".yml"):
        return out + ["(not YAML)", ""]
    header, rows = parse(path.read_text())
    if header:
        out += [header, ""]
    if rows:
        out += ["| key | value | comment |", "|---|---|---|"]
        out += [f"| `{_cell(k)}` | {'`' + _cell(v) + '`' if v else ''} | {_cell(c)} |" for k, v, c in rows]
        out.append("")
    return out


def config_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.is_file())


def render() -> str:
    """The whole reference page, Markdown."""
    files = config_files()
    top = [p for p in files if p.parent == CONFIGS]
    groups: dict[str, list[Path]] = {}
    for p in files:
        if p.parent != CONFIGS:
            groups.setdefault(p.parent.relative_to(CONFIGS).as_posix(), []).append(p)
    out = [
        "# Configuration reference",
        "",
        "Generated from `configs/` at every `mkdocs build` (`docs/hooks.py`): each file, each key with its"
        " value and the comment next to it in the YAML. Edit the YAML, not this page."
        " Every script's primary config is a file at the top of `configs/`; a group is a folder, and"
        " `group=option` picks the file `configs/group/option.yaml` (`+exp=NAME` adds an experiment).",
        "",
        "## Primary configs (one per script)",
        "",
    ]
    out += [f"- `{p.relative_to(ROOT).as_posix()}`" for p in top] + [""]
    out += ["## Groups and their options", "", "| group | options |", "|---|---|"]
    for group, paths in groups.items():
        out.append(f"| `{group}` | " + ", ".join(f"`{p.stem}`" for p in paths) + " |")
    out.append("")
    out += ["## Primary configs, key by key", ""]
    for p in top:
        out += _file_section(p)
    for group, paths in groups.items():
        out += [f"## Group `{group}`", ""]
        for p in paths:
            out += _file_section(p)
    return "\n".join(out) + "\n"


def on_files(files, config):  # noqa: ARG001 - mkdocs hook signature
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
