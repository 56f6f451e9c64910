"The grid driver: plan, dry run, papermill execution, skip-finished, resume after kill -9, failures."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from imitation_nb import core, reproduce as R

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NB = "../tests/reproduce_fixtures/stage_fixture.ipynb"   # relative to nbs/


def cli(*args, check=True, env=None):
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.core import main; sys.exit(main())", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and r.returncode: raise AssertionError(r.stdout + r.stderr)
    return r


def test_dry_run_lists_the_mini_grid_with_papermill_commands_and_bill(tmp_path):
    out = cli("reproduce", "--profile", "mini", "--dry-run", "--runs", str(tmp_path)).stdout
    P = R.plan("mini", root=tmp_path)
    assert f"{len(P)} stage runs" in out
    assert out.count("papermill nbs/") == len(P)
    for stage in ("sources", "mixtures", "nq_synthetic", "finetune", "eval_benchmarks", "eval_toxicity",
                  "generate", "eval_judge", "style", "eval_human", "figures"):
        assert f"] {stage}:" in out, stage
    assert "compute plan for 'mini'" in out and "total" in out
    assert not list(tmp_path.iterdir()), "a dry run must not create run directories"


def test_paper_dry_run_bill_is_the_papers_scale(tmp_path):
    out = cli("reproduce", "--profile", "paper", "--dry-run", "--runs", str(tmp_path)).stdout
    line = [l for l in out.splitlines() if "finetune llama-13b on ShareGPT-Mix" in l and "FLOPs" in l][0]
    flops = float(line.split("FLOPs")[0].split()[-1])
    # 150M assistant tokens / 0.7 assistant share through 13B params, QLoRA: ~4NT + grad-ckpt 2NT ~ 1.7e19
    assert 1e19 < flops < 3e19, line


def test_plan_hashes_change_downstream_when_upstream_params_change(tmp_path):
    a = {sp.label: sp.run_dir for sp in R.plan("smoke", root=tmp_path)}
    over = core.load_profile("smoke", overrides={"grid": {"data_sweep": {"budgets_m": [0.002, 0.004, 0.016]}}})
    b = {sp.label: sp.run_dir for sp in R.plan(over, root=tmp_path)}
    assert a["sources: load + clean imitation data"] == b["sources: load + clean imitation data"]
    ft_a = [v for k, v in a.items() if k.startswith("finetune smollm2-135m on ShareGPT-Mix")]
    ft_b = [v for k, v in b.items() if k.startswith("finetune smollm2-135m on ShareGPT-Mix")]
    assert ft_a and ft_b and ft_a != ft_b


def test_mini_gives_secondary_subjects_fewer_prompts(tmp_path):
    """Primary subjects (the data-sweep base and its top-budget imitation model) get generate.max_items prompts and
    the full toxicity set; secondary ones (smaller budgets, the other size) the profile's secondary_* sizes."""
    prof = core.load_profile("mini")
    g, t = prof.section("generate"), prof.section("eval_toxicity")
    assert g.max_items >= 100 and 0 < g.secondary_max_items < g.max_items and 0 < t.secondary_n_prompts < t.n_prompts
    top = max(prof.grid.data_sweep.budgets_m)
    P = R.plan(prof, root=tmp_path)
    for stage, key, small in (("generate", "max_items", g.secondary_max_items), ("eval_toxicity", "n_prompts", t.secondary_n_prompts)):
        got = {sp.params["subject"]["label"]: sp.params.get(key) for sp in P if sp.stage == stage}
        primary = {"Gemma-3-270M", f"Gemma-3-270M + ShareGPT-Mix {top:g}M"}
        assert primary <= set(got) and len(got) == 5, got
        for label, n in got.items(): assert n == (None if label in primary else small), (stage, label, n)
    # judge and style ask for at least max_items prompts of the references: n >= 100 for base and top budget
    assert prof.section("eval_judge").n_prompts >= g.max_items and prof.section("style").n_prompts >= g.max_items

DRIVER = textwrap.dedent('''
    import sys, json
    from pathlib import Path
    from imitation_nb import reproduce as R
    R.STAGE_NOTEBOOKS["fixture"] = {nb!r}
    root = Path({root!r})
    def mk(name, value, deps=(), sleep=0.0, fail=False, upstream=None):
        params = {{"profile": "t", "value": value, "sleep_s": sleep, "fail": fail, "upstream": upstream}}
        return R.StagePlan("fixture", params, list(deps), name, root / name)
    a = mk("a", 1.0); b = mk("b", 2.0, [a.key], sleep={sleep}, upstream=str(a.run_dir)); c = mk("c", 3.0, [b.key])
    d = mk("d", 4.0, fail={fail}); e = mk("e", 5.0, [d.key])
    st = R.run_plan([a, b, c, d, e], parallel=1)
    st.pop("_times"); print(json.dumps(st)); sys.exit(1 if "failed" in st.values() else 0)
''')


def _driver(tmp_path, sleep, fail):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(nb=FIXTURE_NB, root=str(tmp_path / "runs"), sleep=sleep, fail=fail))
    return [sys.executable, str(script)]


def _executions(tmp_path, name):
    p = tmp_path / "runs" / name / "executions.jsonl"
    return len(core.read_jsonl(p)) if p.exists() else 0


def test_kill_and_restart_reruns_only_unfinished_stages(tmp_path):
    cmd = _driver(tmp_path, sleep=20.0, fail=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while _executions(tmp_path, "b") == 0:         # wait until stage b is running
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert core.read_manifest(tmp_path / "runs" / "a")["status"] == "done"
    assert core.read_manifest(tmp_path / "runs" / "b")["status"] == "running"   # killed mid-stage
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [_executions(tmp_path, n) for n in "abcde"] == [1, 2, 1, 1, 1]        # a not re-run; b re-run once
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(st.values()) == {"done"}
    assert (tmp_path / "runs" / "c" / "fixture.ipynb").exists()                   # executed notebook kept
    df = core.load_results(tmp_path / "runs", include_paper=False)
    assert sorted(df.value) == [1.0, 2.0, 3.0, 4.0, 5.0]
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)   # everything done: nothing runs
    assert [_executions(tmp_path, n) for n in "abcde"] == [1, 2, 1, 1, 1] and "[skip]" in r2.stdout


def test_a_failed_stage_keeps_its_notebook_blocks_dependents_and_exits_nonzero(tmp_path):
    r = subprocess.run(_driver(tmp_path, sleep=0.0, fail=True), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert st[f"fixture:d"] == "failed" and st["fixture:e"] == "blocked" and st["fixture:c"] == "done"
    assert "fixture asked to fail" in (tmp_path / "runs" / "d" / "fixture.ipynb").read_text()
    assert "executed notebook (with the error)" in r.stdout
    assert core.read_manifest(tmp_path / "runs" / "d")["status"] == "failed"


def test_stage_copies_keep_parameters_code_and_stage_cells_but_no_examples():
    P = R.plan("smoke", root="/tmp/imitation_nb_stage_copies")
    for nb in sorted({sp.notebook for sp in P}):
        copy = R.stage_notebook(nb)
        srcs = ["".join(c["source"]) for c in copy["cells"] if c["cell_type"] == "code"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in copy["cells"]), nb
        assert any(s.startswith("#| stage") for s in srcs), nb
        assert not any("nbdev_export" in s or "test_eq(" in s for s in srcs), nb
        n_src = sum(c["cell_type"] == "code" for c in json.loads(nb.read_text())["cells"])
        assert len(srcs) < n_src, nb
    nb = ROOT / "tests" / "reproduce_fixtures" / "stage_fixture.ipynb"
    srcs = ["".join(c["source"]) for c in R.stage_notebook(nb)["cells"]]
    assert not any("an example cell ran" in s for s in srcs) and any("StageRun(" in s for s in srcs)


def test_parallel_stage_runs_split_the_cores_and_restore_the_environment(monkeypatch):
    for k in R.THREAD_VARS: monkeypatch.delenv(k, raising=False)
    old = R._split_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    R._restore_env(old)
    assert all(k not in os.environ for k in R.THREAD_VARS)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")                  # the user's choice is kept
    old = R._split_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == "7"
    R._restore_env(old)
    assert os.environ["OMP_NUM_THREADS"] == "7"
