"The grid driver: plan, dry run, papermill execution, skip-finished, resume after kill -9, failures."
import json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import yaml

from imitation_nb import core, reproduce as R

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NB = "../tests/reproduce_fixtures/stage_fixture.ipynb"   # relative to nbs/


def cli(*args, check=True, env=None):
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())", *args],
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
    r = cli("reproduce", "--profile", "paper", "--dry-run", "--runs", str(tmp_path), check=False)
    # the paper's ShareGPT / HC3 / Discord files are supplied by the user (data/user/...): named, exit 2
    assert r.returncode == 2 and "key 'data.sharegpt[0]': data/user/sharegpt/" in r.stderr, r.stderr
    out = r.stdout
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
    from imitation_nb import stages as S
    S.STAGES["fixture"] = S.Stage("fixture", {nb!r}, "fixture:run_fixture", None)
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


# ------------------------------------------------------------------ the profile a stage reads, and its hash
def _smoke_copy(tmp_path, edit=None, name="smoke_edited.yaml"):
    "configs/smoke.yaml (same `name: smoke`), optionally edited (a function of the parsed YAML), in tmp_path."
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    if edit: edit(raw)
    p = tmp_path / name; p.write_text(yaml.safe_dump(raw, sort_keys=False)); return p


def _changed(a, b):
    "Keys (in plan b) of the stage runs whose run directory differs between two plans of the same grid."
    assert [sp.label for sp in a] == [sp.label for sp in b]
    return {y.key for x, y in zip(a, b) if x.run_dir != y.run_dir}


def _downstream(P, keys):
    "`keys` and every stage run that depends on one of them, directly or not."
    out, grew = set(keys), True
    while grew:
        new = {sp.key for sp in P if sp.key not in out and set(sp.deps) & out}
        out |= new; grew = bool(new)
    return out


def test_an_edited_eval_setting_reruns_only_that_stage_and_the_figures(tmp_path):
    base = R.plan("smoke", root=tmp_path)
    edited = _smoke_copy(tmp_path, lambda r: r["eval_toxicity"].update(k=3))
    P = R.plan(str(edited), root=tmp_path)
    changed = _changed(base, P)
    tox = {sp.key for sp in P if sp.stage == "eval_toxicity"}
    figs = {sp.key for sp in P if sp.stage == "figures"}
    assert tox and changed == tox | figs, sorted(changed)
    # the stages get the file the user gave; run dirs stay under runs/<profile name>/
    assert {sp.params["profile"] for sp in P} == {str(edited.resolve())}
    assert {sp.run_dir.parent.parent for sp in P} == {tmp_path / "smoke"}
    assert all(sp.params["profile"] == str(ROOT / "configs" / "smoke.yaml") for sp in base)


def test_an_edited_finetune_setting_reruns_finetune_and_everything_downstream(tmp_path):
    base = R.plan("smoke", root=tmp_path)
    P = R.plan(str(_smoke_copy(tmp_path, lambda r: r["finetune"].update(lr=5e-4))), root=tmp_path)
    ft = {sp.key for sp in P if sp.stage == "finetune"}
    assert len(ft) == 3 and _changed(base, P) == _downstream(P, ft)
    same = {sp.stage for x, sp in zip(base, P) if x.run_dir == sp.run_dir}
    assert {"sources", "mixtures", "nq_synthetic", "eval_benchmarks", "eval_toxicity", "generate", "eval_judge", "style"} <= same
    for x, sp in zip(base, P):   # the untrained bases' evaluations keep their runs
        if sp.params.get("subject", {}).get("role") == "base": assert x.run_dir == sp.run_dir, sp.label


def test_the_contents_of_a_data_file_are_part_of_the_hash(tmp_path):
    data = tmp_path / "hc3.csv"; shutil.copy(ROOT / "data" / "hc3" / "hc3_sample_500.csv", data)
    prof = _smoke_copy(tmp_path, lambda r: r["data"].update(hc3=[str(data)]))
    a = R.plan(str(prof), root=tmp_path / "runs")
    assert _changed(a, R.plan(str(prof), root=tmp_path / "runs")) == set()     # stable while nothing changes
    with open(data, "a") as f: f.write('"an extra question","an extra answer"\n')
    b = R.plan(str(prof), root=tmp_path / "runs")
    src = {sp.key for sp in b if sp.stage == "sources"}
    assert _changed(a, b) == _downstream(b, src)
    assert {sp.stage for x, sp in zip(a, b) if x.run_dir == sp.run_dir} >= {"nq_synthetic", "eval_benchmarks", "eval_toxicity"}


def test_the_same_profile_by_name_by_path_or_as_a_copy_is_the_same_plan(tmp_path):
    outs = [cli("reproduce", "--profile", ref, "--dry-run", "--runs", str(tmp_path)).stdout
            for ref in ("smoke", "configs/smoke.yaml", str(ROOT / "configs" / "smoke.yaml"))]
    assert outs[0] == outs[1] == outs[2]
    assert f"-p profile {ROOT / 'configs' / 'smoke.yaml'}" in outs[0]
    copy = tmp_path / "copy.yaml"; shutil.copy(ROOT / "configs" / "smoke.yaml", copy)   # same contents elsewhere
    assert [sp.run_dir for sp in R.plan("smoke", root=tmp_path)] == [sp.run_dir for sp in R.plan(str(copy), root=tmp_path)]


def test_every_stage_declares_the_profile_keys_it_reads():
    from imitation_nb import stages as S
    assert all(s.reads for s in S.STAGES.values())
    for name in core.list_profiles():
        prof = core.load_profile(name)
        for sp in R.plan(prof, root="/tmp/imitation_nb_settings"):
            s = R.stage_settings(prof, sp.stage, sp.params)
            assert s == sp.settings and s, (name, sp.key)
    # a subject evaluated through a model entry reads that entry (spec, template, ...), the teacher its section
    prof = core.load_profile("smoke")
    s = R.stage_settings(prof, "eval_benchmarks", {"subject": {"model": "gemma3-270m"}})
    assert s["models.gemma3-270m"]["chat_template"] == "gemma3-plain" and "models.smollm2-135m" not in s
    assert "teacher" in R.stage_settings(prof, "generate", {"subject": {"model": "teacher"}})


def test_a_stage_run_reads_the_profile_file_it_is_given(tmp_path):
    "A real stage notebook (eval_human, cheap) run by the driver records the edited file's value."
    edited = _smoke_copy(tmp_path, lambda r: r["eval_human"].update(n_items=6, n_gold=1))
    sp = next(sp for sp in R.plan(str(edited), root=tmp_path / "runs") if sp.stage == "eval_human")
    fx = ROOT / "tests" / "human_fixtures"
    sp.params.update(generations_file=str(fx / "generations.jsonl"), references_file=str(fx / "references.jsonl"))
    R.execute(sp)
    m = core.read_manifest(sp.run_dir)
    assert m["status"] == "done" and m["params"]["eval_human"]["n_items"] == 6 and m["params"]["eval_human"]["n_gold"] == 1
    assert m["profile"] == "smoke" and m["run_id"] == f"smoke/eval_human/{sp.run_dir.name}"
    assert m["profile_file"] == {"path": str(edited.resolve()), "sha256": core.file_sha256(edited)}
    study = json.loads((sp.run_dir / "study" / "study.json").read_text())
    assert (study["n_items"], study["n_gold"]) == (6, 1)


def test_a_profile_edited_after_planning_fails_the_stage_instead_of_running_it(tmp_path):
    edited = _smoke_copy(tmp_path)
    sp = next(sp for sp in R.plan(str(edited), root=tmp_path / "runs") if sp.stage == "eval_human")
    edited.write_text(edited.read_text().replace("n_items: 10", "n_items: 4"))
    with pytest.raises(R.StageFailed, match="changed since the plan was made"): R.execute(sp)
    assert not sp.run_dir.exists()


def test_a_profile_changed_in_memory_reaches_the_stages_as_a_snapshot(tmp_path):
    over = core.load_profile("smoke", overrides={"eval_human": {"n_items": 6}})
    P = R.plan(over, root=tmp_path)
    refs = {sp.params["profile"] for sp in P}
    assert len(refs) == 1 and Path(next(iter(refs))).parent == tmp_path / "smoke" / "_profiles"
    assert not list(tmp_path.iterdir())                       # planning writes nothing
    R.write_profile_snapshot(P[0])
    assert core.load_profile(P[0].params["profile"]).to_dict() == over.to_dict()
    for name in core.list_profiles():                         # every shipped profile round-trips
        prof = core.load_profile(name, overrides={"seed": 7})
        sp = R.plan(prof, root=tmp_path)[0]; R.write_profile_snapshot(sp)
        assert core.load_profile(sp.params["profile"]).to_dict() == prof.to_dict(), name


def test_an_unknown_stage_in_only_is_a_user_error(tmp_path):
    r = cli("reproduce", "--profile", "smoke", "--only", "sources,finetun", "--runs", str(tmp_path / "runs"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--only: unknown stage 'finetun' (did you mean 'finetune'?)" in r.stderr
    assert not (tmp_path / "runs").exists()


# --- the plan of every shipped profile, pinned (issue #19: `plan` split into named helpers, same plan) ---------------
PLANS = ROOT / "tests" / "reference" / "plans"
PLAN_ROOT = "/tmp/imitation_nb_plan_snapshot"        # a fixed runs root: run dirs and the paths in params are under it


def plan_snapshot(profile: str) -> list[dict]:
    """Each stage run of `plan(profile)`, in order: its key (stage + run-dir hash) and a hash of its parameters, of its
    upstream keys, outputs and label. Paths are written relative to the runs root and the project root."""
    def norm(x): return json.loads(json.dumps(x, sort_keys=True, default=str).replace(PLAN_ROOT, "<runs>").replace(str(core.project_root()), "<project>"))
    return [{"key": sp.key, "params": core.stable_hash(norm(sp.params)),
             "rest": core.stable_hash(norm({"deps": sp.deps, "outputs": sp.outputs, "label": sp.label}))}
            for sp in R.plan(profile, root=PLAN_ROOT)]


@pytest.mark.parametrize("profile", ["smoke", "mini", "modern", "paper"])
def test_the_plan_of_every_shipped_profile_is_unchanged(profile):
    """Same stage runs, same parameters, same run dirs as the snapshot written before `plan` was split into helpers.
    A change *meant* to change a plan (a profile, a data file it names, the planner) rewrites the snapshot:
    `python tests/test_reproduce.py --write-plan-snapshots`, and says why in the commit."""
    want = json.loads((PLANS / f"{profile}.json").read_text())
    got = plan_snapshot(profile)
    assert [r["key"] for r in got] == [r["key"] for r in want]
    assert got == want


if __name__ == "__main__" and "--write-plan-snapshots" in sys.argv:
    PLANS.mkdir(parents=True, exist_ok=True)
    for name in ("smoke", "mini", "modern", "paper"):
        (PLANS / f"{name}.json").write_text(json.dumps(plan_snapshot(name), indent=1) + "\n")
        print(name, len(plan_snapshot(name)), "stage runs")


def test_stage_notebooks_that_define_their_config_class_again_run_through_papermill(tmp_path):
    """The generate stage's notebook copy defines GenerateConfig again; a section built by one class and read after
    the module's class registered must be rebuilt, not refused ('expected a mapping, got GenerateConfig')."""
    prompts = tmp_path / "prompts.jsonl"
    core.append_jsonl(prompts, [{"id": "p0", "prompt": "Name a prime number.", "reference": "7 is prime."}])
    subj = {"model": "smollm2-135m", "adapter": None, "role": "base", "model_family": "SmolLM2", "base_params_b": 0.135,
            "imitation_data": "none", "data_tokens_m": 0.0, "label": "SmolLM2-135M"}
    prof = core.load_profile("smoke", overrides={"generate": {"max_new_tokens": 4}})
    sp = R.stage_maker(prof, tmp_path / "runs")("generate", {"subject": subj, "prompts_file": str(prompts), "max_items": 1})
    R.write_profile_snapshot(sp)
    R.execute(sp)
    recs = core.read_jsonl(sp.run_dir / "generations.jsonl")
    assert core.read_manifest(sp.run_dir)["status"] == "done" and len(recs) == 1 and recs[0]["n_new_tokens"] >= 1
