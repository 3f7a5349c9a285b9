"""Every `python scripts/...` command in README.md and docs/*.md still works with today's configs and
scripts, checked offline in seconds without running anything: a Hydra script's line composes with its
overrides through Hydra's compose API (a multirun `-m` line: every job of its sweep), an argparse script's
line parses. A command shown with the `error: ...` line it prints must still be refused with that line.
A renamed key, config or flag fails here, not in a reader's terminal. The Python snippets compile.

The count of checked commands must equal the grep count of `python scripts/` (occurrences:
`grep -o 'python scripts/' README.md docs/*.md | wc -l`) minus ALLOWED, the lines that cannot be checked
offline, each with its reason.
"""
from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
MARK = "python scripts/"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (page, the command's start as written) -> why it cannot be checked offline
ALLOWED = {
    ("docs/errors.md", "python scripts/..."): "a placeholder for every script, not a command",
    ("docs/caches.md", 'python scripts/sample.py +exp=digits_stitch_0.4 "accel=$accel"'):
        "inside a shell loop: the override is a shell variable ($accel, $d)",
    ("docs/caches.md", "python scripts/evaluate.py $d"): "inside a shell loop: the folder is a shell variable",
    ("docs/caches.md", "python scripts/sample.py +exp=digits_stitch_0.4 accel=<cache>"):
        "<cache> stands for any of the six caches; each one's config is composed by tests/test_caches*.py",
}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--resolve", "--shell-completion", "-sc"}


@dataclass
class Command:
    page: str  # relative to the repository
    line: int  # 1-based, where the (joined) line starts
    text: str  # from `python scripts/` to the end of the command
    error: str | None  # the `error: ...` line printed right below it, when the docs show a refusal

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with its first line's number."""
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = number
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def extract(pages=PAGES) -> list[Command]:
    commands = []
    for page in pages:
        rel = page.relative_to(ROOT).as_posix()
        lines = _logical_lines(page.read_text())
        for k, (number, line) in enumerate(lines):
            following = next((t.strip() for _, t in lines[k + 1:] if t.strip()), "")
            shown = following.startswith("error: ") and line.lstrip().startswith("$ ")  # a prompt, then its error
            error = following[len("error: "):] if shown else None
            for match in re.finditer(re.escape(MARK), line):
                text = line[match.start():]
                if line[: match.start()].count("`") % 2:  # inside an inline code span: up to its end
                    text = text.split("`", 1)[0]
                commands.append(Command(rel, number, text.strip(), error))
    return commands


def grep_count(pages=PAGES) -> int:
    return sum(page.read_text().count(MARK) for page in pages)


def _allowed(command: Command) -> str | None:
    return next((why for (page, start), why in ALLOWED.items()
                 if command.page == page and command.text.startswith(start)), None)


def _argv(text: str) -> tuple[str, list[str]]:
    """`python scripts/x.py a b  # comment | tee ...` -> ("x", ["a", "b"]): shell quoting, up to ; & | < >."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token and set(token) <= set(";&|<>"):
            break
        tokens.append(token)
    assert tokens[0] == "python" and tokens[1].startswith("scripts/"), tokens
    return Path(tokens[1]).stem, tokens[2:]


def _hydra_config_name(script: str) -> str | None:
    match = re.search(r'@hydra\.main\([^)]*config_name="([^"]+)"', (ROOT / "scripts" / f"{script}.py").read_text())
    return match and match.group(1)


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command line, as Hydra's basic sweeper makes them (one job without -m)."""
    if not multirun:
        return [overrides]
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def _hydra_args(args: list[str]) -> tuple[list[str], bool]:
    overrides, multirun, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg in HYDRA_FLAGS or arg.startswith("--cfg=") or arg.startswith("--info="):
            pass
        else:
            assert not arg.startswith("-"), f"unknown flag {arg}"
            overrides.append(arg)
    return overrides, multirun


def _refusal(command: Command, config_name: str, overrides: list[str], monkeypatch) -> None:
    """The command is shown with the `error:` line it prints: composing, or the run's checks that read no
    weights, must raise exactly that message."""
    from diffusion.errors import UserError
    from runs.preflight import check_sample_run, job_config
    from runs.script import composition_error

    monkeypatch.setattr(sys, "argv", [f"scripts/{config_name}.py", *overrides])
    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as ex:  # noqa: BLE001 - mapped to the script's one-line message, or re-raised
        error = composition_error(ex)
        assert error is not None, f"{command.where}: {ex}"
        assert str(error) == command.error, command.where
        return
    assert config_name == "sample", f"{command.where}: a refusal example of a script this test cannot check"
    with pytest.raises(UserError) as error:
        check_sample_run(job_config(cfg))
    assert str(error.value) == command.error, command.where


class _Parsed(Exception):
    pass


def _parse_argparse(script: str, args: list[str], monkeypatch) -> None:
    import runs.script

    class Parser(runs.script.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            raise _Parsed(super().parse_args(args, namespace))

    monkeypatch.setattr(runs.script, "ArgumentParser", Parser)
    spec = importlib.util.spec_from_file_location(f"docs_script_{script}", ROOT / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "ArgumentParser"):
        monkeypatch.setattr(module, "ArgumentParser", Parser)
    with pytest.raises(_Parsed):
        module.main(args)


def check(command: Command, monkeypatch) -> int:
    """Check one command; returns the number of configs composed (0 for an argparse script)."""
    script, args = _argv(command.text)
    assert (ROOT / "scripts" / f"{script}.py").is_file(), f"{command.where}: no such script"
    config_name = _hydra_config_name(script)
    if config_name is None:
        _parse_argparse(script, args, monkeypatch)
        return 0
    overrides, multirun = _hydra_args(args)
    if command.error is not None:
        _refusal(command, config_name, overrides, monkeypatch)
        return 1
    jobs = _jobs(overrides, multirun)
    for job in jobs:
        try:
            compose(config_name=config_name, overrides=job, return_hydra_config=True)
        except Exception as ex:  # noqa: BLE001 - reported with the line it came from
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
            raise AssertionError(f"{command.where}\n  job {job}: {type(ex).__name__}: {first}") from ex
    return len(jobs)


@pytest.fixture
def hydra_configs():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_every_documented_command_composes_or_parses(hydra_configs, monkeypatch):
    commands = extract()
    allowed = [c for c in commands if _allowed(c)]
    unused = [key for key in ALLOWED if not any(c.page == key[0] and c.text.startswith(key[1]) for c in allowed)]
    assert not unused, f"allow-list entries that match no line (remove them): {unused}"
    failures, checked, composed = [], 0, 0
    for command in commands:
        if _allowed(command):
            continue
        try:
            composed += check(command, monkeypatch)
            checked += 1
        except (AssertionError, Exception) as ex:  # noqa: BLE001 - every broken line at once
            first = (str(ex).strip().splitlines() or [""])[0]
            failures.append(str(ex) if command.where in str(ex) else f"{command.where}\n  {type(ex).__name__}: {first}")
    print(f"\ndocs commands: {checked} checked ({composed} Hydra configs composed), {len(allowed)} allow-listed, "
          f"{grep_count()} `{MARK}` in README.md and docs/*.md")
    assert not failures, f"{len(failures)} documented command(s) broken:\n" + "\n".join(failures)
    assert checked == grep_count() - len(allowed), (checked, grep_count(), len(allowed))


def test_a_broken_line_fails(hydra_configs, monkeypatch, tmp_path):
    """The check can fail: a renamed key, a missing config, a bad flag and a wrong refusal message."""
    page = tmp_path / "page.md"
    page.write_text("```bash\npython scripts/sample.py +exp=digits_stitch_0.4 sampler.stpes=5\n"
                    "python scripts/sample.py -m model=dit_s2,no_such_model\n"
                    "python scripts/evaluate.py --no-such-flag outputs/x\n"
                    "$ python scripts/sample.py sampler=plms\nerror: sampler=plms: something else\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    commands = extract([page])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", ROOT)
    assert len(commands) == 4 == grep_count([page])
    for command in commands:
        with pytest.raises((AssertionError, Exception)):
            check(command, monkeypatch)


def test_extraction_joins_continuations_and_cuts_inline_code():
    lines = _logical_lines("a \\\n  b\nc `python scripts/x.py k=v` d\n")
    assert lines == [(1, "a    b"), (3, "c `python scripts/x.py k=v` d")]
    assert _argv("python scripts/sample.py a=1 'b=x y'  # note | tee log") == ("sample", ["a=1", "b=x y"])
    assert _jobs(["a=1,2", "b=x", "c=3,4"], multirun=True) == [
        ["a=1", "b=x", "c=3"], ["a=1", "b=x", "c=4"], ["a=2", "b=x", "c=3"], ["a=2", "b=x", "c=4"]]


def _python_snippets():
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            yield f"{page.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}", match.group(1)


@pytest.mark.parametrize("where,code", list(_python_snippets()), ids=lambda v: v if ":" in str(v) else "")
def test_python_snippets_compile(where, code):
    """The snippets need weights from the hub, so they are not run; they must at least be valid Python."""
    compile(code, where, "exec")
    ast.parse(code)
