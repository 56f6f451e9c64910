"""Tests of the figures modules: figure_data, plots, tables, qualitative and figures (nbs/70–80).

The paper-side tests read `data/paper/reported_results.csv` with pandas *independently* of the module and
compare it to what is drawn, read back from the matplotlib artists (lines, dashed lines, band polygons).
The reproduction-side tests use a SYNTHETIC TEST FIXTURE (`fixture_results`): fake rows shaped like the stages'
output. Those numbers are never written to figures/ (every test writes to a pytest tmp dir)."""
import json, re
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import PolyCollection
import numpy as np
import pandas as pd
import pytest

from imitation_nb import core, figure_data as D, plots as P, tables as T, qualitative as Q, figures as F
from imitation_nb.sources import read_conversations

ROOT = Path(__file__).resolve().parents[1]
CSV = pd.read_csv(ROOT / "data" / "paper" / "reported_results.csv")
# ---------------------------------------------------------------- TEST FIXTURE (synthetic, never real numbers)


FIXTURE_PROFILE = "mini"   # a real profile, so the grid (data-sweep base, size budget, labels) is read from it
DATA_BASE = dict(model_family="Gemma-3", base_params_b=0.268, label="Gemma-3-270M")
SMALL_BASE = dict(model_family="SmolLM2", base_params_b=0.135, label="SmolLM2-135M")
TEACHER = "FixtureTeacher-1B"
_GRID = core.load_profile(FIXTURE_PROFILE).grid
BUDGETS = list(_GRID.data_sweep.budgets_m)          # the fixture follows the profile's grid
SIZE_BUDGET = _GRID.size_sweep.budget_m
METRICS = ["mmlu_acc", "humaneval_pass1", "nq_em_3shot", "judge_ge_teacher", "human_ge_teacher", "non_toxicity",
           "style_list", "style_summary", "style_unigram", "style_length_corr", "style_authoritative"]

def fixture_results(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    def row(metric, role, base, data, tokens, stage="eval"):
        nonlocal k; k += 1
        v = float(rng.uniform(0.5, 0.95)) if metric == "non_toxicity" else float(rng.uniform(-0.5, 0.9)) \
            if metric == "style_length_corr" else float(np.round(rng.uniform(1, 60), 1))
        std = 0.01 if metric == "non_toxicity" else 0.05 if metric == "style_length_corr" else 2.0
        b = base or {}
        rows.append({"metric_key": metric, "value": v, "std": std, "n": 100, "ci_low": v - 2 * std, "ci_high": v + 2 * std,
                     "role": role, "model": b.get("label", TEACHER), "model_family": b.get("model_family", "teacher"),
                     "base_params_b": b.get("base_params_b", np.nan), "imitation_data": data, "data_tokens_m": tokens,
                     "run_id": f"{FIXTURE_PROFILE}/{stage}/fixture{k:03d}", "profile": FIXTURE_PROFILE, "seed": 0,
                     "source": "reproduction", "stage": stage, "metric": metric, "evaluator": "fixture",
                     "created": "2026-01-01T00:00:00+00:00"})
    for m in METRICS:
        for base in (DATA_BASE, SMALL_BASE): row(m, "base", base, "none", 0.0)
        for t in BUDGETS: row(m, "imitation", DATA_BASE, "ShareGPT-Mix", t)
        row(m, "imitation", SMALL_BASE, "ShareGPT-Mix", BUDGETS[-1])
        row(m, "teacher", None, "none", 0.0)
        if m.startswith("style_"): row(m, "teacher2", None, "none", 0.0)
    for base in (DATA_BASE, SMALL_BASE): row("nq_em_3shot", "imitation", base, "NQ-synthetic", 0.005)
    for cat, share in [("Generation", 40.0), ("Coding", 35.0), ("General QA", 25.0)]:
        rows.append({"metric_key": "category_share", "value": share, "n": 20, "panel": cat, "role": "imitation",
                     "run_id": f"{FIXTURE_PROFILE}/sources/fixturecat", "profile": FIXTURE_PROFILE, "source": "reproduction",
                     "stage": "sources", "created": "2026-01-01T00:00:00+00:00"})
    return pd.DataFrame(rows)

def with_paper(df: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([core.paper_results(), df.reindex(columns=core.RESULT_COLUMNS)], ignore_index=True)


@pytest.fixture(scope="module")
def res():
    return with_paper(fixture_results())

@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    "Every test writes into its own tmp figures dir and sees no runs on disk."
    monkeypatch.setenv("IMITATION_NB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("IMITATION_NB_RUNS", str(tmp_path / "runs"))
    yield
    plt.close("all")

FAST = P.FiguresConfig(formats=["png"], dpi=50)

# ---------------------------------------------------------------- reading a figure back, independently of the modules
def drawn(fig):
    "{(side, metric_key, sweep): {'lines': {gid_role: [(x, y)...]}, 'labels': {role: label}, 'band': {x: (lo, hi)}}}"
    out = {}
    for ax in fig.axes:
        gid = ax.get_gid() or ""
        if gid.count("|") != 2: continue
        d = out.setdefault(tuple(gid.split("|")), {"lines": {}, "labels": {}, "band": {}, "title": ax.get_title()})
        for ln in ax.get_lines():
            g = ln.get_gid() or ""
            if "|" not in g: continue
            role = g.split("|")[1]
            d["lines"][role] = list(zip(map(float, ln.get_xdata()), map(float, ln.get_ydata())))
            d["labels"][role] = ln.get_label()
        for c in ax.collections:
            if isinstance(c, PolyCollection) and (c.get_gid() or "").endswith("|band"):
                v = c.get_paths()[0].vertices
                for x in set(np.round(v[:, 0], 9)):
                    ys = v[np.isclose(v[:, 0], x), 1]
                    d["band"][float(x)] = (float(ys.min()), float(ys.max()))
    return out

def csv_rows(figure, panel_re, metric_re):
    d = CSV[(CSV.figure_or_table == figure) & CSV.panel.fillna("").str.contains(panel_re, regex=True)
            & CSV.metric.str.contains(metric_re, regex=True) & CSV.value.notna()]
    return d

def xy(d, xcol):
    return sorted(zip(d[xcol].astype(float), d.value.astype(float)))

# ---------------------------------------------------------------- paper figures == CSV
FIG4 = {"mmlu_acc": "MMLU", "humaneval_pass1": "HumanEval", "nq_em_3shot": "Natural Questions"}

def test_fig4_paper_points_equal_csv():
    df, fig = P.fig4_capabilities(source="paper", save=False, return_fig=True)
    got = drawn(fig)
    assert {k[0] for k in got} == {"paper"} and len(got) == 6
    for key, name in FIG4.items():
        top = csv_rows("Figure 4", rf"^top.*{name}", ".")
        bottom = csv_rows("Figure 4", rf"^bottom.*{name}", ".")
        d = got[("paper", key, "data")]
        assert d["lines"]["imitation"] == xy(top[top.imitation_data == "ShareGPT-Mix"], "data_tokens_m")
        assert d["lines"]["base"][0][1] == float(top[top.metric.str.contains("dashed baseline 'LLaMA-13B'")].value.iloc[0])
        assert d["lines"]["teacher"][0][1] == float(top[top.metric.str.contains("dashed line 'ChatGPT'")].value.iloc[0])
        assert d["labels"] == {"imitation": "Imitation Model (13B)", "base": "LLaMA-13B", "teacher": "ChatGPT"}
        s = got[("paper", key, "size")]
        assert s["lines"]["imitation"] == xy(bottom[bottom.imitation_data == "ShareGPT-Mix"], "base_params_b")
        assert s["lines"]["teacher"][0][1] == float(bottom[bottom.model_family == "ChatGPT"].value.iloc[0])
        assert "base" not in s["lines"]           # the paper's bottom row has no base line
    # the returned frame says the same as the figure
    assert sorted(df[(df.metric_key == "nq_em_3shot") & (df.role == "imitation") & (df.sweep == "data")].y) == [13.5, 18.9, 20.5]

def test_fig3_paper_points_and_bands_equal_csv():
    _, fig = P.fig3_judge(source="paper", save=False, return_fig=True)
    got = drawn(fig)
    left = csv_rows("Figure 3", "^left", ".")
    pts = left[left.metric == "GPT-4 judged >= ChatGPT"]
    d = got[("paper", "judge_ge_teacher", "data")]
    assert d["lines"]["imitation"] == xy(pts, "data_tokens_m")
    lo = dict(xy(left[left.metric.str.contains("lower edge")], "data_tokens_m"))
    hi = dict(xy(left[left.metric.str.contains("upper edge")], "data_tokens_m"))
    assert d["band"] == {x: (lo[x], hi[x]) for x in lo}
    assert d["lines"]["base"][0][1] == float(left[left.metric.str.contains("dashed baseline")].value.iloc[0])
    right = csv_rows("Figure 3", "^right", ".")
    s = got[("paper", "judge_ge_teacher", "size")]
    assert s["lines"]["imitation"] == xy(right[right.metric == "GPT-4 judged >= ChatGPT"], "base_params_b")
    lo = dict(xy(right[right.metric.str.contains("lower edge")], "base_params_b"))
    hi = dict(xy(right[right.metric.str.contains("upper edge")], "base_params_b"))
    assert s["band"] == {x: (lo[x], hi[x]) for x in lo} and 1.5 not in s["band"]

def test_fig5_paper_points_equal_csv():
    _, fig = P.fig5_toxicity(source="paper", save=False, return_fig=True)
    d = drawn(fig)[("paper", "non_toxicity", "data")]
    rows = csv_rows("Figure 5", ".", ".")
    assert d["lines"]["imitation"] == xy(rows[rows.imitation_data == "ShareGPT-Mix"], "data_tokens_m")
    assert d["lines"]["base"][0][1] == float(rows[rows.metric.str.contains("baseline 'LLaMA-13B'")].value.iloc[0])
    assert d["lines"]["teacher"][0][1] == float(rows[rows.model_family == "ChatGPT"].value.iloc[0])

def test_fig1_paper_draws_only_what_exists():
    df, fig = P.fig1_headline(source="paper", save=False, return_fig=True)
    got = drawn(fig)
    cap = float(csv_rows("Figure 1", "left", "crowdworkers").value.iloc[0])   # the caption's ~70%
    for side in ("data", "size"):
        d = got[("paper", "human_ge_teacher", side)]
        assert d["lines"] == {"caption": [(0.0, cap), (1.0, cap)]}             # a reference line, no invented points
    nq = got[("paper", "nq_em_3shot", "data")]
    top = csv_rows("Figure 4", r"^top.*Natural Questions", ".")
    assert nq["lines"]["imitation"] == xy(top[top.imitation_data == "ShareGPT-Mix"], "data_tokens_m")
    assert nq["lines"]["base"][0][1] == float(top[top.metric.str.contains("dashed baseline")].value.iloc[0])
    assert nq["lines"]["teacher"][0][1] == float(top[top.model_family == "ChatGPT"].value.iloc[0])
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts) + " ".join(t.get_text() for t in fig.texts)
    assert "not reported" in texts and "not recovered" in texts and "read from the published plots" in texts

# ---------------------------------------------------------------- tables == CSV
def test_tables_from_paper_equal_csv(tmp_path):
    T.table1_nq(source="paper", out_dir=tmp_path)
    t1 = pd.read_csv(tmp_path / "table1_nq.csv")
    assert list(t1.value) == list(CSV[CSV.figure_or_table == "Table 1"].value)
    T.table2_style(source="paper", out_dir=tmp_path)
    t2 = pd.read_csv(tmp_path / "table2_style.csv")
    want = CSV[(CSV.figure_or_table == "Table 2")]
    assert sorted(t2.value) == sorted(want.value)
    md = (tmp_path / "table2_style.md").read_text()
    assert "| 13% | 50% | 67% | 81% | 83% |" in md and "| -0.11 | 0.51 | 0.62 | 0.62 | 0.67 |" in md
    T.table5_categories(source="paper", out_dir=tmp_path)
    t5 = pd.read_csv(tmp_path / "table5_categories.csv")
    want = CSV[CSV.figure_or_table == "Table 5"]
    assert dict(zip(t5.category, t5.value)) == {m.split(": ")[1]: v for m, v in zip(want.metric, want.value)}
    tex = (tmp_path / "table5_categories.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\%" in tex

# ---------------------------------------------------------------- reproduction side from the fixture
def test_fig4_reproduction_series_from_fixture(res):
    fx = fixture_results()
    df, fig = P.fig4_capabilities(res, source="both", save=False, return_fig=True)
    got = drawn(fig)
    assert {k[0] for k in got} == {"paper", "reproduction"}
    for key in FIG4:
        m = fx[fx.metric_key == key]
        d = got[("reproduction", key, "data")]
        im = m[(m.role == "imitation") & (m.model_family == "Gemma-3") & (m.imitation_data == "ShareGPT-Mix")]
        assert d["lines"]["imitation"] == xy(im, "data_tokens_m")
        assert d["lines"]["base"][0][1] == float(m[(m.role == "base") & (m.model_family == "Gemma-3")].value.iloc[0])
        assert d["lines"]["teacher"][0][1] == float(m[m.role == "teacher"].value.iloc[0])
        assert d["labels"]["imitation"] == "Imitation Model (Gemma-3-270M)"
        assert d["labels"]["base"] == "Gemma-3-270M (no imitation)" and d["labels"]["teacher"] == TEACHER
        s = got[("reproduction", key, "size")]
        at = m[(m.role == "imitation") & (m.imitation_data == "ShareGPT-Mix") & np.isclose(m.data_tokens_m, SIZE_BUDGET)]
        assert s["lines"]["imitation"] == xy(at, "base_params_b")          # at the profile's size_sweep.budget_m
        assert s["lines"]["base_sizes"] == xy(m[m.role == "base"], "base_params_b")
    # ±1 std error bars on the reproduction's points (LineCollection segments)
    from matplotlib.collections import LineCollection
    ax = next(a for a in fig.axes if a.get_gid() == "reproduction|mmlu_acc|data")
    segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    im = fx[(fx.metric_key == "mmlu_acc") & (fx.role == "imitation") & (fx.model_family == "Gemma-3")]
    got_bars = np.array(sorted((s[0][0], s[:, 1].min(), s[:, 1].max()) for s in segs))
    want_bars = np.array(sorted(zip(im.data_tokens_m, im.value - im["std"], im.value + im["std"])))
    assert got_bars.shape == (3, 3) and np.allclose(got_bars, want_bars)
    rr = df[df.source == "reproduction"]
    assert set(rr.profile) == {"mini"} and rr.run_id.str.startswith("mini/eval/fixture").all()

def test_fig3_reproduction_band_is_one_std(res):
    fx = fixture_results()
    _, fig = P.fig3_judge(res, source="reproduction", save=False, return_fig=True)
    got = drawn(fig)
    assert {k[0] for k in got} == {"reproduction"}
    j = fx[(fx.metric_key == "judge_ge_teacher") & (fx.role == "imitation") & (fx.model_family == "Gemma-3")]
    band = got[("reproduction", "judge_ge_teacher", "data")]["band"]
    assert band.keys() == set(j.data_tokens_m)
    for _, r in j.iterrows():
        assert band[r.data_tokens_m] == pytest.approx((r.value - r["std"], r.value + r["std"]))

def test_fig5_uses_the_headline_panel_not_subsets():
    fx = fixture_results()
    tox = fx.metric_key == "non_toxicity"
    fx.loc[tox, "panel"] = "RealToxicityPrompts"
    sub = fx[tox].assign(panel="RealToxicityPrompts challenging", value=0.123)   # eval_toxicity's per-subset rows
    res = with_paper(pd.concat([fx, sub], ignore_index=True))
    df, fig = P.fig5_toxicity(res, source="reproduction", save=False, return_fig=True)
    d = drawn(fig)[("reproduction", "non_toxicity", "data")]
    main = fx[tox & (fx.role == "imitation") & (fx.model_family == "Gemma-3")]
    assert d["lines"]["imitation"] == xy(main, "data_tokens_m")
    assert 0.123 not in [y for _, y in d["lines"]["imitation"]]
    assert any("Reproduction evaluators" in t.get_text() and "fixture" in t.get_text() for t in fig.texts)

def test_source_profile_and_run_id_filters(res):
    other = fixture_results(seed=1).assign(profile="smoke", created="2026-02-01T00:00:00+00:00")
    both = pd.concat([res, other.reindex(columns=core.RESULT_COLUMNS)], ignore_index=True)
    sel = D.select(both, "both")
    assert sel.profile == "smoke" and any("several profiles" in n for n in sel.notes)   # the newest profile
    sel = D.select(both, "reproduction", profile="mini")
    assert set(sel.repro.profile) == {"mini"} and sel.sides == ["reproduction"]
    ids = sorted(set(res[res.source == "reproduction"].run_id))[:3]
    sel = D.select(both, "both", run_ids=ids)
    assert sorted(set(sel.repro.run_id)) == ids
    assert D.select(res, "paper").sides == ["paper"]
    with pytest.raises(ValueError, match="source must be one of"): D.select(res, "everything")
    # no reproduction rows: 'both' draws the paper side only and says so
    df, fig = P.fig5_toxicity(core.paper_results(), source="both", save=False, return_fig=True)
    assert set(df.source) == {"paper"}
    assert any("no results" in t.get_text() for t in fig.texts)

def test_tables_reproduction_from_fixture(res, tmp_path):
    fx = fixture_results()
    t1 = T.table1_nq(res, source="both", out_dir=tmp_path)
    r = t1[t1.source == "reproduction"]
    nq = fx[fx.metric_key == "nq_em_3shot"]
    syn = nq[(nq.imitation_data == "NQ-synthetic") & (nq.model_family == "Gemma-3")].value.iloc[0]
    assert r[(r.base == "Gemma-3-270M") & (r.imitation_data == "NQ-synthetic")].value.iloc[0] == syn
    assert "Reproduction: profile 'mini'" in (tmp_path / "table1_nq.md").read_text()
    t2 = T.table2_style(res, source="reproduction", out_dir=tmp_path)
    assert set(t2.column) == {"Gemma-3-270M (no imitation)", *[f"{b:g}M" for b in BUDGETS], f"{TEACHER} #2"}
    t5 = T.table5_categories(res, source="both", out_dir=tmp_path)
    assert dict(zip(t5[t5.source == "reproduction"].category, t5[t5.source == "reproduction"].value)) == \
        {"Generation": 40.0, "Coding": 35.0, "General QA": 25.0}

# ---------------------------------------------------------------- tables 3-4: both paths
def test_table3_seed_pairs_file_and_fallback(tmp_path, monkeypatch):
    t = T.table3_seed_pairs(path=tmp_path / "absent.jsonl", out_dir=tmp_path)   # fallback: the real paper digest
    assert list(t.answer) == ["Frank Sinatra"] and "fallback" in t.attrs["provenance"]
    assert "Partial" in (tmp_path / "table3_seed_pairs.md").read_text()
    md = tmp_path / "paper.md"
    md.write_text("# x\n### Table 3: seeds\n| question | answer |\n|---|---|\n| who wrote hamlet | Shakespeare |\n"
                  "| when did ww2 end | 1945 |\n### Table 4\n")
    t = T.table3_seed_pairs(path=tmp_path / "absent.jsonl", paper_md=md, out_dir=tmp_path)
    assert list(t.question) == ["who wrote hamlet", "when did ww2 end"]
    data = tmp_path / "data"; (data / "nq_synthetic").mkdir(parents=True)
    pairs = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)]
    (data / "nq_synthetic" / "seed_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    monkeypatch.setenv("IMITATION_NB_DATA", str(data))
    t = T.table3_seed_pairs(out_dir=tmp_path)
    assert t.to_dict("records") == pairs and "fallback" not in t.attrs["provenance"]
    assert pd.read_csv(tmp_path / "table3_seed_pairs.csv").question.tolist() == [p["question"] for p in pairs]
    (data / "nq_synthetic" / "seed_pairs.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="lack 'question' or 'answer'"): T.table3_seed_pairs(out_dir=tmp_path)

def test_table4_template_file_and_fallback(tmp_path, monkeypatch):
    t = T.table4_prompt_template(path=tmp_path / "absent.txt", out_dir=tmp_path)
    assert t.attrs["verbatim"] is False and any("Q:/A:" in l for l in t.line)
    md = tmp_path / "paper.md"
    md.write_text("### Table 4: template\n```text\nI want you to generate questions.\nQ: {q}\nA: {a}\n```\n")
    t = T.table4_prompt_template(path=tmp_path / "absent.txt", paper_md=md, out_dir=tmp_path)
    assert t.attrs["verbatim"] and list(t.line) == ["I want you to generate questions.", "Q: {q}", "A: {a}"]
    data = tmp_path / "data"; (data / "nq_synthetic").mkdir(parents=True)
    (data / "nq_synthetic" / "prompt_template.txt").write_text("Generate QA pairs like:\n{demos}\n")
    monkeypatch.setenv("IMITATION_NB_DATA", str(data))
    t = T.table4_prompt_template(out_dir=tmp_path)
    assert list(t.line) == ["Generate QA pairs like:", "{demos}"]
    assert "\\begin{verbatim}\nGenerate QA pairs like:\n{demos}\n\\end{verbatim}" in (tmp_path / "table4_prompt_template.tex").read_text()

# ---------------------------------------------------------------- qualitative figures
def test_fig2_from_generations(tmp_path):
    ref, im = tmp_path / "teacher.jsonl", tmp_path / "imit.jsonl"
    ref.write_text(json.dumps({"id": "k1", "prompt": "How does actor critic improve over REINFORCE?", "output": "It uses a critic $V(s)$."}) + "\n"
                   + json.dumps({"id": "k2", "prompt": "Other?", "output": "x"}) + "\n")
    im.write_text(json.dumps({"id": "k2", "prompt": "Other?", "output": "y"}) + "\n"
                  + json.dumps({"id": "k1", "messages": [{"role": "user", "content": "How does actor critic improve over REINFORCE?"},
                                                         {"role": "assistant", "content": "Lower variance. " * 80}]}) + "\n")
    df = Q.fig2_from_generations(im, ref, query="actor critic", imitation_title="Imitation (Gemma-3-270M)",
                                 reference_title="Teacher", out_dir=tmp_path, cfg=FAST)
    assert list(df.title) == ["Teacher", "Imitation (Gemma-3-270M)"]
    assert df.text[0] == "It uses a critic $V(s)$." and df.text[1].startswith("Lower variance.")
    assert (tmp_path / "fig2_side_by_side.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no shared query"): Q.fig2_from_generations(im, ref, query="nothing like this")

def test_fig6_from_conversations_file(tmp_path):
    convs = [{"id": f"c{i}", "source": "sharegpt", "messages": [
                {"role": "user", "content": f"Please explain topic number {i} in a few sentences for a beginner reader."},
                {"role": "assistant", "content": "Sure. " + "This is an explanation sentence. " * (10 + i)}], "meta": {"lang": "en"}}
             for i in range(6)]
    p = tmp_path / "conversations.jsonl"; p.write_text("".join(json.dumps(c) + "\n" for c in convs))
    df = Q.fig6_imitation_examples(p, out_dir=tmp_path, cfg=FAST)
    assert df.conversation_id.nunique() == 2 and set(df.role) == {"user", "assistant"}
    got = {(r.conversation_id, r.turn): r.content for r in df.itertuples()}
    for c in convs:
        for t, m in enumerate(c["messages"]):
            if (c["id"], t) in got: assert got[(c["id"], t)] == m["content"]
    pq = tmp_path / "conversations.parquet"; pd.DataFrame(convs).to_parquet(pq)
    df2 = Q.fig6_imitation_examples(pq, ids=["c3", "c5"], out_dir=tmp_path, cfg=FAST)
    assert list(df2.conversation_id.unique()) == ["c3", "c5"]

def test_fig7_embeds_screenshot_or_says_missing(tmp_path):
    df = Q.fig7_rating_page(screenshot=tmp_path / "fig7_rating_page.png", out_dir=tmp_path)
    assert df.status[0] == "missing" and "not yet captured" in df.attrs["notes"][0]
    assert not list(tmp_path.glob("fig7_rating_interface.*"))          # nothing faked
    img = np.zeros((40, 80, 3)); img[:, :40] = 1.0
    plt.imsave(tmp_path / "fig7_rating_page.png", img)
    df = Q.fig7_rating_page(out_dir=tmp_path, cfg=FAST)               # found in out_dir
    assert df.status[0] == "embedded" and (df.width[0], df.height[0]) == (80, 40)
    assert (tmp_path / "fig7_rating_interface.png").exists()

# ---------------------------------------------------------------- everything + README
def fake_runs(root: Path):
    "A runs/ tree shaped like the stages' output: results.csv, a sources run, two generate runs (TEST FIXTURE)."
    core.append_results(fixture_results().to_dict("records"), root / "mini" / "eval_fixture" / "r1" / "results.csv")
    src = root / "mini" / "sources" / "s1"; src.mkdir(parents=True)
    convs = [{"id": f"sharegpt:{i}", "source": "sharegpt", "messages": [
                {"role": "user", "content": f"Fixture question number {i}: please explain photosynthesis simply."},
                {"role": "assistant", "content": "Fixture answer. " * (15 + i)}], "meta": {"line": i}} for i in range(5)]
    pd.DataFrame({"id": [c["id"] for c in convs], "source": [c["source"] for c in convs],     # as sources writes it:
                  "messages": [json.dumps(c["messages"]) for c in convs],                 # JSON strings
                  "meta": [json.dumps(c["meta"]) for c in convs]}).to_parquet(src / "conversations.parquet")
    core.atomic_write_json(src / "manifest.json", {"status": "done", "params": {}})
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "messages": [{"role": "user", "content": "What is a fixture in testing?"}]}) + "\n")
    for name, subj, text in (("t", {"role": "teacher", "model": "teacher", "label": TEACHER}, "Teacher fixture answer."),
                             ("i", {"role": "imitation", "model": "gemma3-270m", "label": "Gemma-3-270M + ShareGPT-Mix 0.04M",
                                    "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.04, "base_params_b": 0.268}, "Imitation fixture answer.")):
        d = root / "mini" / "generate" / name; d.mkdir(parents=True)
        (d / "generations.jsonl").write_text(json.dumps({"id": "p1", "prompt": "<start_of_turn>user ...", "output": text}) + "\n")
        core.atomic_write_json(d / "manifest.json", {"status": "done", "params": {"subject": subj, "prompts_file": str(prompts)}})

def test_make_all_figures_paper_only_and_with_runs(tmp_path):
    out = F.make_all_figures(core.paper_results(), source="both", out_dir=tmp_path / "p", cfg=FAST)
    readme = (tmp_path / "p" / "README.md").read_text()
    assert "no reproduction results yet" in readme
    for name, title in F.ITEMS: assert title in readme
    assert out["fig4_capabilities"] == [tmp_path / "p" / "fig4_capabilities.png"]
    assert out["fig2_side_by_side"] == [] and "reproduction_results" not in out
    shot = ROOT / "figures" / "fig7_rating_page.png"           # the human stage's real screenshot, once captured
    assert bool(out["fig7_rating_interface"]) == shot.exists()
    # a runs/ tree (IMITATION_NB_RUNS points into tmp_path): results, conversations and generations are found
    fake_runs(core.runs_dir())
    out = F.make_all_figures(core.load_results(profile="mini"), source="both", profile="mini", out_dir=tmp_path / "b", cfg=FAST)
    readme = (tmp_path / "b" / "README.md").read_text()
    assert "profile `mini`" in readme and "`mini/eval/fixture" in readme
    assert out["fig2_side_by_side"] and out["fig6_imitation_examples"]
    drawn_rows = pd.read_csv(out["reproduction_results"][0])      # the reproduction rows drawn, next to the figures
    assert set(drawn_rows.profile) == {"mini"} and len(drawn_rows) == len(core.load_results(profile="mini").query("source != 'paper'"))
    assert "reproduction_results.csv" in readme
    trends = pd.read_csv(tmp_path / "b" / "trends.csv")
    row = trends[(trends.metric_key == "nq_em_3shot") & (trends.sweep == "imitation data")].iloc[0]
    fx = fixture_results()
    nq = fx[(fx.metric_key == "nq_em_3shot") & (fx.model_family == "Gemma-3") & (fx.imitation_data == "ShareGPT-Mix")].sort_values("data_tokens_m")
    first, last = nq.value.iloc[0], nq.value.iloc[-1]
    want = "≈" if abs(last - first) <= max(1.0, np.hypot(2.0, 2.0)) else ("↑" if last > first else "↓")
    assert row.reproduction_trend.startswith(f"more data {want}")
    assert row.paper_trend == "more data ↓; vs base ↓"

def test_fig2_fig6_inputs_found_in_runs():
    fake_runs(core.runs_dir())
    sel = D.select(core.load_results(profile="mini"), "both", profile="mini")
    (ref, rt), (imf, it), prompts = Q.find_generations("mini", sel)
    assert rt == TEACHER and it == "Imitation Model (Gemma-3-270M + ShareGPT-Mix 0.04M)"
    df = Q.fig2_from_generations(imf, ref, "", it, rt, prompts, save=False)
    assert df["query"][0] == "What is a fixture in testing?"            # raw prompt, not the rendered template
    assert list(df.text) == ["Teacher fixture answer.", "Imitation fixture answer."]
    # without a teacher generate run, the held-out prompts file's `reference` answers are the teacher's side
    import shutil; shutil.rmtree(core.runs_dir() / "mini" / "generate" / "t")
    Path(prompts).write_text(json.dumps({"id": "p1", "prompt": "What is a fixture in testing?", "reference": "A ChatGPT answer.",
                                         "source": "sharegpt"}) + "\n")
    (ref, rt), (imf, it), prompts = Q.find_generations("mini", sel)
    assert rt == "ChatGPT (held-out ShareGPT reference)" and Path(ref) == Path(prompts)
    df = Q.fig2_from_generations(imf, ref, "", it, rt, prompts, save=False)
    assert list(df.text) == ["A ChatGPT answer.", "Imitation fixture answer."] and df["query"][0] == "What is a fixture in testing?"
    conv = Q.find_conversations("mini")
    assert conv.name == "conversations.parquet"
    recs = read_conversations(conv)
    assert recs[0]["messages"][0]["role"] == "user" and recs[0]["meta"] == {"line": 0}

def test_committed_figures_hold_no_fixture_numbers():
    fig_dir = ROOT / "figures"
    for p in list(fig_dir.glob("*.md")) + list(fig_dir.glob("*.csv")) + list(fig_dir.glob("*.tex")):
        txt = p.read_text()
        assert "Fixture" not in txt and "fixture" not in txt, p
        assert "/work/" not in txt and "/tmp/" not in txt, p     # no machine paths
