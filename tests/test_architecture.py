"""The package's shape (issue #19): the stage registry is the only place that names stage modules; the import graph
(every `import` in the generated package, module level or inside functions) has no cycle; `core` imports no stage."""
import ast, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "imitation_nb"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "_modidx")


def imports_of(mod: str) -> set[str]:
    "Package modules `mod` imports (absolute `imitation_nb.x` or relative `.x` imports, anywhere in the file)."
    out = set()
    for n in ast.walk(ast.parse((PKG / f"{mod}.py").read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level == 1: out |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
            elif n.module == "imitation_nb": out |= {a.name for a in n.names}
            elif n.module and n.module.startswith("imitation_nb."): out.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("imitation_nb.")}
    return {m for m in out if m in MODULES and m != mod}


def test_import_graph_has_no_cycle():
    G = {m: imports_of(m) for m in MODULES}
    state = {}
    def visit(m, path):
        if state.get(m) == "done": return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(G[m]): visit(d, path + [m])
        state[m] = "done"
    for m in MODULES: visit(m, [])
    assert G["cli"] >= {"stages"} and "reproduce" in G and G["stages"] == {"core"}   # the graph was really read


def test_core_imports_no_stage_and_names_none():
    from imitation_nb import stages
    assert imports_of("core") == set()
    src = (PKG / "core.py").read_text()
    for s in stages.STAGES.values():
        assert f"imitation_nb.{s.module.split('.')[-1]}" not in src, s.name
    assert "import_module" not in src and "__import__" not in src


def test_only_the_registry_imports_modules_by_name():
    "importlib.import_module / __import__ / find_spec of a package module happen in stages.py only."
    pat = re.compile(r"(import_module|__import__|find_spec)\(\s*[^)]*imitation_nb")
    offenders = [m for m in MODULES if m != "stages" and pat.search((PKG / f"{m}.py").read_text())]
    assert not offenders, offenders
    from imitation_nb import stages
    for s in stages.STAGES.values():           # every declared entry point exists and follows the naming rule
        assert callable(stages.entry_point(s.name)) and s.entry.endswith(f":run_{s.name}")
    for c in stages.COMMANDS: assert callable(stages.command(c))


def test_every_stage_notebook_calls_its_entry_point_in_one_line():
    import json
    from imitation_nb import stages
    for s in stages.STAGES.values():
        nb = json.loads(s.notebook_path.read_text())
        cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        stage_cells = [c for c in cells if c.startswith("#| stage")]
        fn = s.entry.split(":")[1]
        first = [c.split("\n", 2)[1] for c in stage_cells if c.count("\n")]
        # the stage cell's first statement runs the stage; what follows only displays its outputs
        assert any(re.search(rf"\b{fn}\(", line) for line in first), f"{s.notebook}: no `#| stage` cell starts with {fn}(...)"
        assert not any("StageRun" in c or "add_results" in c for c in stage_cells), s.notebook   # no stage logic in cells
