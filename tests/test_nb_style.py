"tests/nb_style.py: the notebook-style measures (issue #19) and its `--check`, usable as a CI step."
import json, subprocess, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nb_style as S

# restyled in #19 (wave 2); the other notebooks join the list once theirs are merged
RESTYLED = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))   # every notebook (#19)


def _nb(path, cells):
    "A notebook of `cells`: (kind, source[, tags])."
    nb = {"cells": [{"cell_type": "markdown" if c[0] == "md" else "code", "metadata": {"tags": c[2]} if len(c) > 2 else {},
                     "source": c[1], **({"outputs": [], "execution_count": None} if c[0] != "md" else {})} for c in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_measures_of_a_hand_made_notebook(tmp_path):
    nb = _nb(tmp_path / "01_x.ipynb", [
        ("code", "#| default_exp x"), ("code", "#| export\nimport os"), ("code", "#| hide\nfrom fastcore.test import *"),
        ("code", "#| export\ndef f(x):\n    return x + 1"), ("md", "Prose between."), ("code", "test_eq(f(1), 2)"),
        ("code", "#| export\ndef g(): pass"), ("code", "#| export\ndef h(): pass"), ("code", "h()"),
        ("code", "p = 1", ["parameters"]), ("code", "#| export\ndef k(): pass"), ("code", "#| hide\nimport nbdev"),
        ("code", "assert k() is None")])
    r = S.notebook_style(nb)
    # counted: export os (2), f (3), test (1), g (2), h (2), h() (1), k (2), assert (1): median 2
    assert (r["code_cells"], r["median_lines"], r["exports"], r["exports_tested"]) == (8, 2, 5, 2)
    assert S.misses(r) == ["2 of 5 exports followed by a test (40% < 50%)"]


def test_a_markdown_cell_over_600_words_is_a_miss(tmp_path):
    "Long prose belongs in docs/ with a summary in the notebook: a 601-word cell misses, a 600-word cell does not."
    ok = S.notebook_style(_nb(tmp_path / "04_ok.ipynb", [("md", " ".join(["word"] * 600)), ("code", "x = 1")]))
    long = S.notebook_style(_nb(tmp_path / "05_long.ipynb", [("md", " ".join(["word"] * 601)), ("code", "x = 1")]))
    assert (ok["longest_markdown"], S.misses(ok)) == (600, [])
    assert S.misses(long) == ["a markdown cell of 601 words > 600"]


def test_check_exits_1_naming_what_a_notebook_misses(tmp_path, capsys):
    longer = _nb(tmp_path / "03_longer.ipynb", [("code", "#| export\n" + "\n".join(f"x{i} = {i}" for i in range(20)))])
    assert S.main(["--check", str(longer)]) == 1
    err = capsys.readouterr().err
    assert "03_longer.ipynb misses the targets: median code cell 21 lines > 10; 0 of 1 exports followed by a test (0% < 50%)" in err
    assert S.main([str(longer)]) == 0                       # without --check: the table only


def test_check_passes_and_markdown_table(tmp_path, capsys):
    good = _nb(tmp_path / "04_good.ipynb", [("code", "#| export\ndef f(): return 1"), ("code", "assert f() == 1")])
    assert S.main(["--check", "--markdown", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| notebook | code cells | median lines |")
    assert "| 04_good.ipynb | 2 | 1.5 | 1 | 1 | 100% | 0 | yes |" in out


def test_unknown_notebook_or_option_exits_2(capsys):
    assert S.main(["--check", "99_nothing"]) == 2 and "99_nothing: no such notebook" in capsys.readouterr().err
    assert S.main(["--chekc"]) == 2


def test_names_resolve_to_notebooks():
    assert S.notebook_paths(["40_generate", "41_sandbox.ipynb", str(S.NBS / "index.ipynb")]) == \
        [S.NBS / "40_generate.ipynb", S.NBS / "41_sandbox.ipynb", S.NBS / "index.ipynb"]
    assert S.notebook_paths() == sorted(S.NBS.glob("*.ipynb"))


def test_restyled_notebooks_meet_the_targets():
    r = subprocess.run([sys.executable, str(Path(S.__file__)), "--check", *RESTYLED], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
