"""Notebook style, measured (issue #19): per notebook, the median length of its code cells and the share of its
exported definitions followed by a test cell. nbdev's own notebooks: median ~5 lines, ~50% of exports followed by a test.

    python tests/nb_style.py [--markdown] [--check] [NOTEBOOK ...]

NOTEBOOK: a notebook's name (`40_generate`, `40_generate.ipynb`) or path; default: every notebook in `nbs/`.
`--markdown` prints the table as Markdown (for `docs/notebook-style.md`). `--check` prints, for each notebook that
misses a target, which one and by how much, and exits 1 if any does (0 otherwise): usable as a CI step, on every
notebook or on the ones a change touched. A name that is not a notebook exits 2.

Targets: median code-cell length <= 10 lines, >= 50 % of export cells followed by a test, and no markdown cell longer
than 600 words (longer explanations and measurements go to `docs/`, with a short summary in the notebook).
Counted code cells: every code cell except the `#| default_exp` line, `#| hide` cells (imports, `nbdev_export()`) and
the papermill `parameters` cell; a cell's length is its number of non-blank lines. An export cell (`#| export`,
`#| exporti`, `#| exports`) counts as *followed by a test* when the next code cell (markdown between them is fine; a
`#| hide` cell without a check is skipped) is not an export cell and checks something (`test_eq`, `test_fail`,
`test_close`, `test_ne`, `test_is`, `test_stdout`, `test_warns`, `assert`)."""
import json, re, statistics, sys
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / "nbs"
MAX_MEDIAN, MIN_TESTED, MAX_WORDS = 10, 0.5, 600
_TEST = re.compile(r"\b(test_eq|test_fail|test_close|test_ne|test_is|test_stdout|test_warns)\(|^\s*assert\b", re.M)
_EXPORT = {"export", "exporti", "exports"}


def _directives(src: str) -> set[str]:
    "The nbdev directives (`#| export`, `#|hide`, ...) at the top of a code cell."
    out = set()
    for line in src.lstrip().splitlines():
        if not line.startswith("#|"): break
        out.update(line[2:].replace(":", " ").split()[:1])
    return out


def notebook_style(path: Path) -> dict:
    "The style measures of one notebook: counted code cells, their median length, exports, exports followed by a test."
    nb = json.loads(Path(path).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counted, exports, tested = [], 0, 0
    prose = [len("".join(c["source"]).split()) for c in nb["cells"] if c["cell_type"] == "markdown"]
    for i, c in enumerate(code):
        src = "".join(c["source"]); d = _directives(src)
        if "parameters" in c.get("metadata", {}).get("tags", []) or d & {"default_exp", "hide"}: continue
        counted.append(len([l for l in src.splitlines() if l.strip()]))
        if d & _EXPORT:
            exports += 1
            nxt = next((x for x in code[i + 1:] if not (_directives("".join(x["source"])) & {"hide"}) or
                        _TEST.search("".join(x["source"]))), None)
            if nxt is not None:
                ns = "".join(nxt["source"])
                if not (_directives(ns) & _EXPORT) and _TEST.search(ns): tested += 1
    return {"notebook": Path(path).name, "code_cells": len(counted), "median_lines": statistics.median(counted) if counted else 0,
            "exports": exports, "exports_tested": tested, "tested_share": tested / exports if exports else 1.0,
            "longest_markdown": max(prose, default=0)}


def misses(row: dict) -> list[str]:
    "The targets `row` misses, each with its value (empty: the notebook meets them all)."
    out = []
    if row["median_lines"] > MAX_MEDIAN: out.append(f"median code cell {row['median_lines']:g} lines > {MAX_MEDIAN}")
    if row["tested_share"] < MIN_TESTED:
        out.append(f"{row['exports_tested']} of {row['exports']} exports followed by a test ({row['tested_share']:.0%} < {MIN_TESTED:.0%})")
    if row["longest_markdown"] > MAX_WORDS: out.append(f"a markdown cell of {row['longest_markdown']} words > {MAX_WORDS}")
    return out


def notebook_paths(names=()) -> list[Path]:
    "The notebooks `names` designate (names with or without `.ipynb`, or paths); every notebook of `nbs/` if none."
    if not names: return sorted(NBS.glob("*.ipynb"))
    out = []
    for n in names:
        p = Path(n)
        cands = [p, NBS / p.name, NBS / f"{p.name}.ipynb"] if p.suffix != ".ipynb" else [p, NBS / p.name]
        hit = next((c for c in cands if c.suffix == ".ipynb" and c.is_file()), None)
        if hit is None: raise FileNotFoundError(f"{n}: no such notebook (looked for {', '.join(map(str, cands))})")
        out.append(hit)
    return out


def table(rows: list[dict], markdown: bool = False) -> str:
    "The measures as a text or Markdown table, with whether each notebook meets the targets."
    ok = lambda r: "yes" if not misses(r) else "no"
    if markdown:
        lines = ["| notebook | code cells | median lines | exports | followed by a test | share | longest markdown (words) | meets targets |",
                 "|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['notebook']} | {r['code_cells']} | {r['median_lines']:g} | {r['exports']} | {r['exports_tested']} | "
                  f"{r['tested_share']:.0%} | {r['longest_markdown']} | {ok(r)} |" for r in rows]
    else:
        lines = [f"{'notebook':<28}{'cells':>6}{'median':>8}{'exports':>9}{'tested':>8}{'share':>7}{'words':>7}{'ok':>5}"]
        lines += [f"{r['notebook']:<28}{r['code_cells']:>6}{r['median_lines']:>8g}{r['exports']:>9}{r['exports_tested']:>8}"
                  f"{r['tested_share']:>7.0%}{r['longest_markdown']:>7}{ok(r):>5}" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--markdown", "--check"}
    if unknown: print(f"unknown option(s): {', '.join(sorted(unknown))}\n{__doc__}", file=sys.stderr); return 2
    try: paths = notebook_paths([a for a in argv if not a.startswith("--")])
    except FileNotFoundError as e: print(e, file=sys.stderr); return 2
    rows = [notebook_style(p) for p in paths]
    print(table(rows, markdown="--markdown" in flags))
    if "--check" not in flags: return 0
    bad = [(r["notebook"], m) for r in rows if (m := misses(r))]
    for name, m in bad: print(f"{name} misses the targets: {'; '.join(m)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
