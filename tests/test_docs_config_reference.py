"""The configuration reference (built from configs/ by docs/hooks.py at every mkdocs build) lists every
file under configs/ and every group option, with the comments the YAML carries."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_lists_every_file_under_configs():
    page = _hooks().render()
    files = sorted(p for p in (ROOT / "configs").rglob("*") if p.is_file())
    assert len(files) > 50  # the glob found the tree, not nothing
    missing = [p.relative_to(ROOT).as_posix() for p in files if f"### `{p.relative_to(ROOT).as_posix()}`" not in page]
    assert not missing, missing


def test_reference_lists_each_group_with_its_options():
    page = _hooks().render()
    row = next(line for line in page.splitlines() if line.startswith("| `accel` |"))
    for option in ("none", "tstitch", "tgate", "deep_cache", "first_block_cache"):
        assert f"`{option}`" in row, option


def test_comments_survive_including_continuation_lines():
    """OmegaConf drops comments: the page reads the text. A key's comment spread over several lines is one cell."""
    hooks = _hooks()
    _, rows = hooks.parse((ROOT / "configs" / "accel" / "tgate.yaml").read_text())
    by_key = {key: comment for key, _, comment in rows}
    assert "guidance stops here" in by_key["tgate.gate_step"]
    assert "guidance kept to the end" in by_key["tgate.gate_step"]  # the continuation line, not the next key's
    assert by_key["tgate.sp_interval"].startswith("before the gate")
    _, rows = hooks.parse((ROOT / "configs" / "sample.yaml").read_text())
    assert ["seed", "0", "sample k draws all its noise from seed + k"] in rows


def test_parse_keeps_hash_inside_quotes_and_nests_keys():
    _, rows = _hooks().parse('a:\n  b: "x # y"  # the comment\n  c:\n    d: 1\n')
    assert rows == [["a", "", ""], ["a.b", '"x # y"', "the comment"], ["a.c", "", ""], ["a.c.d", "1", ""]]


def test_nav_lists_every_page_and_the_generated_reference():
    """mkdocs --strict fails on a nav entry with no page; this catches the reverse, a page left out of the nav."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) > 15
    missing = [name for name in [*pages, _hooks().PAGE] if name not in nav]
    assert not missing, missing
