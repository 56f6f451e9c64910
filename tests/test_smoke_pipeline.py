"README command 1 at the `smoke` profile: the whole grid, end to end, through papermill, on the embedded models."
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

from imitation_nb import core, reproduce as R

ROOT = Path(__file__).resolve().parents[1]

# The whole smoke grid: 43 papermill stage runs (3 QLoRA trainings, 7 evaluated models), two at once.
# Measured 2026-12-02 on the 2-core machine, quiet: 859 s (14.3 min) before the MMLU prefix change.


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "IMITATION_NB_FIGURES": str(tmp / "figures"), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())",
                        "reproduce", "--profile", "smoke", "--runs", str(tmp / "runs")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    print(r.stdout[-6000:], r.stderr[-3000:])
    return tmp, r, time.time() - t0


def test_smoke_grid_completes(smoke_run):
    tmp, r, secs = smoke_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    P = R.plan("smoke", root=tmp / "runs")
    assert all(R.status(sp) == "done" for sp in P), [(sp.key, R.status(sp)) for sp in P if R.status(sp) != "done"]
    for sp in P:                                   # every stage run keeps its executed notebook and manifest
        assert (sp.run_dir / f"{sp.stage}.ipynb").exists()
        m = core.read_manifest(sp.run_dir)
        assert m["wall_time_s"] >= 0 and m["versions"]["transformers"]
    assert "elapsed per stage" in r.stdout
    print(f"smoke grid: {secs:.0f} s")


def test_smoke_results_cover_every_evaluation(smoke_run):
    tmp, r, _ = smoke_run
    df = core.load_results(tmp / "runs", include_paper=False)
    keys = set(df.metric_key)
    for k in ("nq_em_3shot", "mmlu_acc", "humaneval_pass1", "non_toxicity", "judge_ge_teacher", "style_list",
              "style_unigram", "style_length_corr", "heldout_loss"):
        assert k in keys, (k, sorted(keys))
    imit = df[(df.role == "imitation") & (df.metric_key == "mmlu_acc")]
    assert set(imit.imitation_data) == {"ShareGPT-Mix", "NQ-synthetic"}
    assert sorted(set(imit[imit.imitation_data == "ShareGPT-Mix"].data_tokens_m)) == [0.001, 0.002, 0.004]
    assert (df.n > 0).all() and df.value.notna().all()
    acc = df[df.metric_key.isin(["mmlu_acc", "nq_em_3shot", "humaneval_pass1"])]
    assert acc.value.between(0, 100).all()
    # real training: the data-sweep adapter's held-out loss on real ChatGPT answers falls below the base's
    h = df[(df.metric_key == "heldout_loss") & (df.model.str.startswith("SmolLM2"))]
    base = h[h.role == "base"].value.iloc[0]
    top = h[(h.imitation_data == "ShareGPT-Mix") & (h.data_tokens_m == 0.004)].value.iloc[0]
    assert top < base - 0.01, (base, top)


def test_smoke_capability_token_shift_and_verdicts(smoke_run):
    """The stages beyond the paper ran for the data sweep: capability accuracies per task and pooled, token-shift
    shares that add up to 100 %, and one verdict per claim in figures/verdicts.json with the figures 8-10."""
    tmp, r, _ = smoke_run
    df = core.load_results(tmp / "runs", include_paper=False)
    cap = df[df.metric_key == "cap_pooled_acc"]
    assert len(cap) == 4 and cap.value.between(0, 100).all() and (cap.n == 16).all(), cap[["role", "data_tokens_m", "value", "n"]]
    ts = df[df.metric_key.str.startswith("token_shift_") & (df.panel == "")]
    for _, g in ts[ts.metric_key.isin(["token_shift_unshifted", "token_shift_marginal", "token_shift_shifted"])].groupby("data_tokens_m"):
        assert len(g) == 3 and abs(g.value.sum() - 100) < 1e-6, g
    fig = tmp / "figures"
    import pandas as pd
    table = pd.read_csv(fig / "verdicts.csv")
    assert {"style_list", "heldout_loss", "token_shift", "capability", "nq", "mmlu"} <= set(table.claim), sorted(set(table.claim))
    assert set(table.verdict) <= {"reproduced", "opposite", "inconclusive at this n"}, table.verdict
    v = json.loads((fig / "verdicts.json").read_text())
    assert len(v["claims"]) == 3 and all(c.startswith("**") for c in v["claims"]), v["claims"]
    for stem in ("fig8_token_shift", "fig9_capability", "fig10_heldout_loss"):
        assert (fig / f"{stem}.png").exists(), stem
    assert (fig / "table6_shifted_tokens.md").exists() and (fig / "verdicts.md").exists()


def test_smoke_figures_and_report(smoke_run):
    tmp, r, _ = smoke_run
    fig = tmp / "figures"
    for stem in ("fig3_judge", "fig4_capabilities", "fig5_toxicity"):
        assert (fig / f"{stem}.pdf").exists() and (fig / f"{stem}.png").exists(), sorted(p.name for p in fig.iterdir())
    for stem in ("table1_nq", "table2_style"):
        for ext in ("md", "tex", "csv"): assert (fig / f"{stem}.{ext}").exists(), stem + ext
    rep = (fig / "README.md").read_text()
    assert "smoke/" in rep                         # lists source run ids of the reproduction


REFERENCE = ROOT / "tests" / "reference" / "smoke_results.csv"
KEY = ["stage", "model", "role", "metric_key", "metric", "panel", "imitation_data", "data_tokens_m", "evaluator"]
NUMBERS = ["value", "n", "std", "ci_low", "ci_high"]


def test_smoke_rows_equal_the_reference(smoke_run):
    """Every result row of the reference smoke run (tests/reference/smoke_results.csv, written from the smoke grid of
    commit c996318, before the #19 redesign) is reproduced with the same numbers: refactoring changes no result.
    A deliberate change of the smoke profile or of a metric rewrites the reference (see tests/reference/README.md)."""
    import numpy as np, pandas as pd
    tmp, r, _ = smoke_run
    ref = pd.read_csv(REFERENCE, dtype={"panel": str, "note": str})
    got = core.load_results(tmp / "runs", include_paper=False)
    for df in (ref, got):
        for c in KEY: df[c] = df[c].astype(str)
    # the same number written by two runs (e.g. a base's held-out loss, scored by both of its fine-tuning runs) is one row
    ref, got = (df.drop_duplicates(KEY + NUMBERS) for df in (ref, got))
    m = ref.merge(got, on=KEY, how="left", suffixes=("_ref", ""), indicator=True)
    missing = m[m["_merge"] != "both"]
    assert missing.empty, missing[KEY].to_string()
    assert len(m) == len(ref), "a reference row matched several rows"
    for c in NUMBERS:
        a, b = m[f"{c}_ref"].astype(float).to_numpy(), m[c].astype(float).to_numpy()
        same = np.isclose(a, b, rtol=1e-9, atol=1e-12) | (np.isnan(a) & np.isnan(b))
        assert same.all(), m.loc[~same, KEY + [f"{c}_ref", c]].to_string()
