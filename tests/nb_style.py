"""Notebook style, measured (issue #19): per notebook, the median length of its code cells and the share of its
exported definitions followed by a test cell. nbdev's own notebooks: median ~5 lines, ~50% of exports followed by a test.

    python tests/nb_style.py [--markdown] [--check]     # --check: exit 1 if a notebook misses a target

Counted code cells: every code cell except the `#| default_exp` line, `#| hide` cells (imports, `nbdev_export()`) and
the papermill `parameters` cell. An export cell (`#| export`, `#| exporti`, `#| exports`) counts as *followed by a
test* when the next code cell (markdown between them is fine) is not an export cell and checks something
(`test_eq`, `test_fail`, `test_close`, `test_ne`, `assert`)."""
import json, re, statistics, sys
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / "nbs"
MAX_MEDIAN, MIN_TESTED = 10, 0.5
_TEST = re.compile(r"\b(test_eq|test_fail|test_close|test_ne|test_is|test_stdout|test_warns)\(|^\s*assert\b", re.M)


def _directives(src: str) -> set[str]:
    out = set()
    for line in src.lstrip().splitlines():
        if not line.startswith("#|"): break
        out.update(line[2:].replace(":", " ").split()[:1])
    return out


def notebook_style(path: Path) -> dict:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counted, exports, tested = [], 0, 0
    for i, c in enumerate(code):
        src = "".join(c["source"]); d = _directives(src)
        if "parameters" in c.get("metadata", {}).get("tags", []) or d & {"default_exp", "hide"}: continue
        counted.append(len([l for l in src.splitlines() if l.strip()]))
        if d & {"export", "exporti", "exports"}:
            exports += 1
            nxt = next((x for x in code[i + 1:] if not (_directives("".join(x["source"])) & {"hide"}) or
                        _TEST.search("".join(x["source"]))), None)
            if nxt is not None:
                ns = "".join(nxt["source"])
                if not (_directives(ns) & {"export", "exporti", "exports"}) and _TEST.search(ns): tested += 1
    return {"notebook": path.name, "code_cells": len(counted), "median_lines": statistics.median(counted) if counted else 0,
            "exports": exports, "exports_tested": tested, "tested_share": tested / exports if exports else 1.0}


def table(markdown: bool = False) -> list[dict]:
    rows = [notebook_style(p) for p in sorted(NBS.glob("*.ipynb"))]
    if markdown:
        print("| notebook | code cells | median lines | exports | followed by a test | share |\n|---|---:|---:|---:|---:|---:|")
        for r in rows: print(f"| {r['notebook']} | {r['code_cells']} | {r['median_lines']:g} | {r['exports']} | {r['exports_tested']} | {r['tested_share']:.0%} |")
    else:
        print(f"{'notebook':<28}{'cells':>6}{'median':>8}{'exports':>9}{'tested':>8}{'share':>7}")
        for r in rows: print(f"{r['notebook']:<28}{r['code_cells']:>6}{r['median_lines']:>8g}{r['exports']:>9}{r['exports_tested']:>8}{r['tested_share']:>7.0%}")
    return rows


if __name__ == "__main__":
    rows = table("--markdown" in sys.argv)
    bad = [r["notebook"] for r in rows if r["median_lines"] > MAX_MEDIAN or r["tested_share"] < MIN_TESTED]
    if "--check" in sys.argv and bad: print("missing the targets:", ", ".join(bad)); sys.exit(1)
