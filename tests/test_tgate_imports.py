"""tgate's modules import each other one way: no circle, also through imports made inside functions
(`apply.py` and `pipelines.py` used to import each other), and the public API is where it was."""
import ast
from pathlib import Path

TGATE = Path(__file__).resolve().parent.parent / "tgate"


def _tgate_imports(path: Path) -> set[str]:
    """The tgate modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tgate."):
            found.add(node.module.split(".")[1])
    return found


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_tgate_modules_import_no_circle():
    graph = {p.stem: _tgate_imports(p) - {p.stem} for p in TGATE.glob("*.py") if p.stem != "__init__"}
    assert "pipelines" in graph["apply"] and "apply" not in graph["pipelines"]  # the circle that was
    assert _circle(graph) is None, _circle(graph)
    # the checker finds a circle when there is one
    assert _circle({**graph, "pipelines": graph["pipelines"] | {"apply"}}) == ["apply", "pipelines", "apply"]


def test_public_api_is_unchanged():
    import tgate
    from tgate.apply import apply_tgate, gate_attention, is_gated, remove_tgate, ungate_attention

    assert (tgate.apply_tgate, tgate.remove_tgate, tgate.is_gated) == (apply_tgate, remove_tgate, is_gated)
    assert callable(gate_attention) and callable(ungate_attention)
    for name in ("TgateSDLoader", "TgateSDXLLoader", "TgatePixArtAlphaLoader", "TgatePixArtSigmaLoader",
                 "TgateSVDLoader", "TgateSDDeepCacheLoader", "TgateSDXLDeepCacheLoader", "PipelineGate"):
        assert callable(getattr(tgate, name)), name
