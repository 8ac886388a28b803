"""The house's arrows, read from the source: no import cycles, no forbidden arrows, no private names.

    cli → api, sweep → methods → {algorithms: train, lc, lc_state, acdc, cram, fw, digits}
                                 {formats: artifact, checkpoint, report}  → recipe, modelio → schemes, structure → util, errors

Formats know nothing of training, `fw` and `cram` never import `lc`, nothing under lccompress/ imports
rich or click (the screen belongs to the CLI). Every import counts, also those inside functions.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {  # module prefix → layer; a module may import only lower layers, or its own package
    "lccompress.errors": 0, "lccompress.version": 0, "lccompress.util": 0,
    "lccompress.schemes": 1, "lccompress.structure": 1,
    "lccompress.recipe": 2, "lccompress.modelio": 2, "lccompress.distributed": 2, "lccompress.implicit": 2,
    "lccompress.train": 3, "lccompress.lc": 3, "lccompress.lc_config": 3, "lccompress.lc_state": 3, "lccompress.fw": 3, "lccompress.digits": 3,
    "lccompress.acdc": 3, "lccompress.cram": 3,
    "lccompress.artifact": 3, "lccompress.checkpoint": 3, "lccompress.report": 3,
    "lccompress.methods": 4,
    "lccompress.api": 5, "lccompress.sweep": 5,
    "lccompress": 6,
    "lccompress.cli": 7,
    "lccompress.__main__": 8,  # python -m lccompress: runs the CLI
}
ALGORITHMS = ("lccompress.train", "lccompress.lc", "lccompress.lc_config", "lccompress.lc_state", "lccompress.fw",
              "lccompress.digits", "lccompress.acdc", "lccompress.cram")
FORMATS = ("lccompress.artifact", "lccompress.checkpoint", "lccompress.report")
FORBIDDEN = [  # (importer prefix, imported prefixes)
    (FORMATS, ALGORITHMS + ("lccompress.methods", "lccompress.api", "lccompress.sweep")),
    (ALGORITHMS, FORMATS),
    (("lccompress.fw", "lccompress.cram"), ("lccompress.lc", "lccompress.lc_config", "lccompress.lc_state",
                                            "lccompress.methods")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "lccompress", "lccompress"), (ROOT / "cli", "lccompress.cli")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if _is_package(name) else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, []) if sub in MODULES else (mod, [a.name]))
    return out


def _layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def _within(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in MODULES)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_arrows_point_down(mod):
    for target, _ in GRAPH[mod]:
        if not target.startswith("lccompress") or target == mod:
            continue
        for src, dst in FORBIDDEN:
            assert not (_within(mod, src) and _within(target, dst)), f"{mod} imports {target}"
        own_pkg = mod.rsplit(".", 1)[0] if not _is_package(mod) else mod
        same_package = target.startswith(own_pkg + ".") and own_pkg != "lccompress"
        assert same_package or _layer(target) <= _layer(mod), f"{mod} (layer {_layer(mod)}) imports {target} " \
                                                             f"(layer {_layer(target)})"


def test_no_screen_below_the_cli():
    for mod, imports in GRAPH.items():
        if _within(mod, ("lccompress.cli",)):
            continue
        bad = [t for t, _ in imports if t.split(".")[0] in ("rich", "click")]
        assert not bad, f"{mod} imports {bad}"


def test_no_private_names_of_other_modules():
    for mod, imports in GRAPH.items():
        for target, names in imports:
            if target.startswith("lccompress") and target != mod:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{mod} imports {private} from {target}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path [a, …, a], or None (depth-first search)."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [m, t] if t in stack else [m, t]
            if t not in state and (c := visit(t, stack + [m])):
                return c
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m, [])):
            return c
    return None


def test_no_import_cycles():
    # "lccompress" itself (the public surface, re-exporting the layers) is left out of the walk
    edges = {m: {t for t, _ in GRAPH[m] if t in MODULES and t not in (m, "lccompress")}
             for m in MODULES if m != "lccompress"}
    assert find_cycle(edges) is None, "import cycle: " + " → ".join(find_cycle(edges))


def test_the_checker_sees_a_planted_cycle_and_arrows():
    """The rules above would catch violations: an invented cycle, and formats / fw importing lc."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    fake = {"lccompress.artifact.bad": [("lccompress.lc", [])], "lccompress.fw.sfw": [("lccompress.lc", [])]}
    hits = [(m, t) for m, ims in fake.items() for t, _ in ims for src, dst in FORBIDDEN
            if _within(m, src) and _within(t, dst)]
    assert len(hits) == 2
