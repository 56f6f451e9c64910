"""`reproduce --executor slurm`, `status` and `cancel` against a real single-node SLURM cluster (issue #23).

The cluster is `tests/slurm_cluster.py`'s (root only: the tests skip with the reason otherwise, or fail with
IMITATION_NB_REQUIRE_SLURM=1). The grid is the smoke profile cut down to its first stages (sources, mixtures, one
fine-tune, one evaluation) at smoke sizes, each job on one of the node's two CPUs."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import slurm_cluster, slurm_session  # noqa: F401  (pytest fixtures)
from imitation_nb import core, reproduce as R, slurm as S

ROOT = Path(__file__).resolve().parents[1]
ONLY = "sources,mixtures,finetune,eval_capability"


def tiny_profile(path: Path, partition: str, **slurm) -> Path:
    "The smoke profile with one base, one budget and no NQ-synthetic: sources -> mixtures -> finetune -> evaluations."
    d = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    d["name"], d["description"] = "slurmsmoke", "smoke's first stages on a SLURM test cluster"
    d["grid"] = {"data_sweep": {"base": "smollm2-135m", "budgets_m": [0.001], "nq_synthetic": False},
                 "size_sweep": {"bases": ["smollm2-135m"], "budget_m": 0.001}, "teacher_evals": False, "base_evals": False}
    d["eval_capability"] = {"tasks": ["arc_easy", "piqa"], "n": 2}
    one = {"cpus": 1, "mem": "1G", "time": "00:30:00"}
    d["slurm"] = {"partition": partition, "setup": ["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"],
                  "resources": {k: dict(one) for k in S.KINDS}, **slurm}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if check and r.returncode: raise AssertionError(f"imitation-nb {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def selected(prof_file, runs):
    return [sp for sp in R.plan(core.load_profile(prof_file), root=runs) if sp.stage in ONLY.split(",")]


def wait_settled(P, name, timeout=1500):
    "Poll `plan_status` until no run of `P` is queued or running; returns the rows by key."
    t0 = time.monotonic()
    while True:
        rows = {r["key"]: r for r in S.plan_status(P, name)}
        if not any(r["state"] in ("queued", "running") for r in rows.values()): return rows
        assert time.monotonic() - t0 < timeout, S.format_status(list(rows.values()), name)
        time.sleep(2)


def results(root):
    "Result rows without what names the run (run ids, paths) or when it ran."
    df = core.load_results(root, include_paper=False).drop(columns=["run_id", "created"])
    return df.sort_values(["stage", "metric_key", "panel", "value"], na_position="first").reset_index(drop=True)


def squeue_ids(c) -> set[str]:
    return set(c.run("squeue", "-h", "--states=all", "-o", "%i").stdout.split())


def test_first_smoke_stages_run_as_slurm_jobs_in_dependency_order_and_resume(slurm_cluster, tmp_path):
    c = slurm_cluster
    prof = tiny_profile(tmp_path / "slurmsmoke.yaml", c.partition)
    runs, local = tmp_path / "slurm-runs", tmp_path / "local-runs"
    out = cli("reproduce", "--profile", str(prof), "--executor", "slurm", "--only", ONLY, "--runs", str(runs)).stdout
    P = selected(prof, runs)
    assert [sp.stage for sp in P] == ["sources", "mixtures", "finetune", "eval_capability"], [sp.key for sp in P]
    assert "submitted 4 jobs (0 already queued or running, 0 done)" in out, out
    rows = wait_settled(P, "slurmsmoke")
    assert all(r["state"] == "done" for r in rows.values()), S.format_status(list(rows.values()), "slurmsmoke")

    # the jobs ran under SLURM: one recorded job id per run, completed in the job-completion log, its stdout in the run dir
    ids = {sp.key: S.read_record(sp)["job_id"] for sp in P}
    for jid in ids.values(): c.wait(jid)          # a run is done when its manifest says so; its job may still be ending
    acct = {r["JobID"]: r for r in c.sacct(*ids.values())}
    for sp in P:
        jid = ids[sp.key]
        assert acct[jid]["State"] == "COMPLETED" and acct[jid]["JobName"] == f"imnb-slurmsmoke-{sp.stage}-{sp.run_dir.name}"
        assert f"imitation_nb: {sp.key} in SLURM job {jid} on " in (sp.run_dir / f"slurm-{jid}.out").read_text()
        assert (sp.run_dir / f"{sp.stage}.ipynb").exists() and (sp.run_dir / "slurm_job.sh").exists()
        job = c.job(jid)
        assert (job["Partition"], job["NumCPUs"], job["TimeLimit"]) == (c.partition, "1", "00:30:00"), job
    # dependency order: each job started after its upstream job ended (and its stage after the upstream stage finished)
    for sp in P:
        for d in sp.deps:
            up = next(u for u in P if u.key == d)
            assert acct[ids[sp.key]]["Start"] >= acct[ids[d]]["End"], (sp.key, d, acct)
            assert core.read_manifest(sp.run_dir)["started"] >= core.read_manifest(up.run_dir)["finished"]
            assert S.read_record(sp)["after"] == {d: ids[d]}

    # the same stages through the local driver give the same result rows
    cli("reproduce", "--profile", str(prof), "--only", ONLY, "--runs", str(local), "--parallel", "1")
    a, b = results(runs), results(local)
    assert len(a) > 0 and set(a.stage) == {"mixtures", "finetune", "eval_capability"}, a[["stage", "metric_key"]]
    num = ["value", "n", "std", "ci_low", "ci_high"]
    assert a.drop(columns=num).equals(b.drop(columns=num)), (a, b)
    for col in num: assert a[col].fillna(-1).to_numpy() == pytest.approx(b[col].fillna(-1).to_numpy(), rel=1e-6, abs=1e-9), col

    # a second submission submits nothing
    before = squeue_ids(c)
    out2 = cli("reproduce", "--profile", str(prof), "--executor", "slurm", "--only", ONLY, "--runs", str(runs)).stdout
    assert "submitted 0 jobs (0 already queued or running, 4 done)" in out2, out2
    assert squeue_ids(c) == before and {sp.key: S.read_record(sp)["job_id"] for sp in P} == ids
    st = cli("status", "--profile", str(prof), "--runs", str(runs), "--only", ONLY).stdout
    assert st.splitlines()[0] == "profile 'slurmsmoke': 4 stage runs: 4 done", st


def test_cancelled_or_failed_jobs_cancel_their_dependants_and_status_says_so(slurm_cluster, tmp_path):
    c = slurm_cluster
    runs = tmp_path / "runs"
    prof = tiny_profile(tmp_path / "slurmsmoke.yaml", c.partition)
    P = selected(prof, runs)
    src, mix, ft, ev = P

    # (1) scancel the running sources job: SLURM cancels its dependants (--kill-on-invalid-dep=yes)
    cli("reproduce", "--profile", str(prof), "--executor", "slurm", "--only", ONLY, "--runs", str(runs))
    ids = {sp.key: S.read_record(sp)["job_id"] for sp in P}
    c.wait(ids[src.key], until={"RUNNING"})
    c.run("scancel", ids[src.key])
    for jid in ids.values(): assert c.wait(jid)["JobState"] == "CANCELLED"
    rows = wait_settled(P, "slurmsmoke")
    assert [rows[sp.key]["state"] for sp in P] == ["cancelled"] * 4
    assert rows[src.key]["detail"] == f"job {ids[src.key]} cancelled while running"
    assert rows[mix.key]["detail"] == f"job {ids[mix.key]} cancelled before it started: upstream {src.key} cancelled"
    assert rows[ev.key]["detail"] == f"job {ids[ev.key]} cancelled before it started: upstream {ft.key} cancelled"
    st = cli("status", "--profile", str(prof), "--runs", str(runs), "--only", ONLY).stdout
    assert st.splitlines()[0] == "profile 'slurmsmoke': 4 stage runs: 4 cancelled", st
    assert f"upstream {src.key} cancelled" in st

    # (2) a new submission submits the cancelled runs again; `cancel` cancels every queued or running job of the plan
    out = cli("reproduce", "--profile", str(prof), "--executor", "slurm", "--only", ONLY, "--runs", str(runs)).stdout
    assert "submitted 4 jobs" in out, out
    ids2 = {sp.key: S.read_record(sp)["job_id"] for sp in P}
    assert set(ids2.values()).isdisjoint(ids.values()) and S.read_record(src)["previous"] == [ids[src.key]]
    out = cli("cancel", "--profile", str(prof), "--runs", str(runs)).stdout
    assert "cancelled 4 jobs" in out, out
    for jid in ids2.values(): assert c.wait(jid)["JobState"] == "CANCELLED"
    assert cli("cancel", "--profile", str(prof), "--runs", str(runs)).stdout.strip() == "profile 'slurmsmoke': no queued or running SLURM job"

    # (3) a failing job: the profile changes between submission and the job's start; its dependants are cancelled
    runs3 = tmp_path / "runs3"
    prof3 = tiny_profile(tmp_path / "slurmsmoke.yaml", c.partition, extra=["--begin=now+8"])
    P3 = selected(prof3, runs3)
    text = prof3.read_text()
    cli("reproduce", "--profile", str(prof3), "--executor", "slurm", "--only", ONLY, "--runs", str(runs3))
    prof3.write_text(text.replace("category_sample: 50", "category_sample: 51"))      # the sources stage reads data.*
    ids3 = {sp.key: S.read_record(sp)["job_id"] for sp in P3}
    assert c.wait(ids3[P3[0].key], timeout=120)["JobState"] == "FAILED"
    for sp in P3[1:]: assert c.wait(ids3[sp.key])["JobState"] == "CANCELLED"
    prof3.write_text(text)                                  # `status` plans from the profile: the one submitted
    st = cli("status", "--profile", str(prof3), "--runs", str(runs3), "--only", ONLY).stdout
    assert st.splitlines()[0] == "profile 'slurmsmoke': 4 stage runs: 1 failed, 3 cancelled", st
    assert f"failed     {P3[0].key}" in st and "FAILED (exit 1:0)" in st
    assert "      | imitation_nb: FAILED" in st and "changed since the plan was made (data)" in st
    assert f"upstream {P3[0].key} failed" in st


# --- without a cluster: the dry run, the multi-GPU fine-tuning job, the executor's name --------------------------------
def blocks(out: str) -> dict[str, str]:
    "The dry run's job blocks by stage run key ('# ---- $J<n>: <key> (<label>)' then the script)."
    return {b.split(" ", 2)[1]: b for b in out.split("# ---- ")[1:]}


def test_paper_dry_run_prints_every_sbatch_script_with_resources_and_symbolic_dependencies(tmp_path):
    r = cli("reproduce", "--profile", "paper", "--executor", "slurm", "--dry-run", "--runs", str(tmp_path), check=False)
    # the paper's ShareGPT / HC3 / Discord files are supplied by the user: named on stderr, exit 2, after the scripts
    assert r.returncode == 2 and "key 'data.sharegpt[0]': data/user/sharegpt/" in r.stderr, r.stderr
    P = R.plan("paper", root=tmp_path)
    out, jobs = r.stdout, blocks(r.stdout)
    assert out.count("#!/bin/bash") == len(P) == len(jobs) == 63 and f"would submit {len(P)} jobs" in out
    num = {sp.key: i for i, sp in enumerate(P, 1)}
    for sp in P:
        b = jobs[f"{sp.key}"]
        assert b.startswith(f"$J{num[sp.key]}: {sp.key} ({sp.label})"), b[:200]
        deps = [f"$J{num[d]}" for d in sp.deps]
        assert (f"#SBATCH --dependency=afterok:{':'.join(deps)}\n" in b) == bool(deps), b
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in b and f"#SBATCH --output={sp.run_dir}/slurm-%j.out\n" in b
        assert f"-c '{S.JOB_CODE}' {sp.run_dir / 'slurm_stage.json'}\n" in b
    ft = next(sp for sp in P if sp.label.startswith("finetune llama-13b on ShareGPT-Mix"))
    b = jobs[ft.key]                                  # configs/paper.yaml: slurm.resources.train, compute.num_gpus = 1
    for o in ("--gres=gpu:1", "--cpus-per-task=16", "--mem=128G", "--time=3-00:00:00"): assert f"#SBATCH {o}\n" in b, o
    assert "accelerate" not in b                      # one GPU: the stage runs directly
    judge = next(sp for sp in P if sp.stage == "eval_judge")
    assert "--gres" not in jobs[judge.key] and "#SBATCH --mem=16G\n" in jobs[judge.key]   # slurm.stages.eval_judge
    gen = next(sp for sp in P if sp.stage == "generate")
    assert "#SBATCH --gres=gpu:1\n" in jobs[gen.key] and "#SBATCH --time=12:00:00\n" in jobs[gen.key]
    assert not list(tmp_path.iterdir())              # a dry run writes nothing


def test_multi_gpu_finetuning_job_asks_for_the_gpus_the_stage_launches(tmp_path):
    """A fine-tuning job asks for compute.num_gpus GPUs and runs the stage in one process: the stage launches its
    training processes itself (30_finetune.launch_finetune), so the job must not wrap it in a second launcher."""
    prof = core.load_profile("paper", overrides={"compute": {"num_gpus": 4}, "slurm": {"resources": {"train": {"gpu_type": "a100"}}}})
    cfg = S.slurm_config(prof)
    ft = next(sp for sp in R.plan(prof, root=tmp_path) if sp.stage == "finetune")
    script = S.job_script(ft, S.resources(prof, cfg, "finetune"), cfg, "paper", ["17"])
    assert "#SBATCH --gres=gpu:a100:4\n" in script and "#SBATCH --dependency=afterok:17\n" in script
    cmd = script.splitlines()[-1]
    assert "accelerate" not in cmd and cmd.endswith(f"-c '{S.JOB_CODE}' {ft.run_dir / 'slurm_stage.json'}")
    gen = next(sp for sp in R.plan(prof, root=tmp_path) if sp.stage == "generate")      # evaluations: one GPU
    assert "#SBATCH --gres=gpu:1\n" in S.job_script(gen, S.resources(prof, cfg, "generate"), cfg, "paper", [])
    bad = core.load_profile("paper", overrides={"slurm": {"resources": {"train": {"gpus": 4}}}})   # compute.num_gpus = 1
    with pytest.raises(core.UserError, match="compute.num_gpus is 1"):
        S.resources(bad, S.slurm_config(bad), "finetune")


def test_an_unknown_executor_is_a_user_error_before_planning(tmp_path):
    r = cli("reproduce", "--profile", "smoke", "--executor", "slrum", "--runs", str(tmp_path / "runs"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--executor: unknown executor 'slrum' (did you mean 'slurm'?); executors: local, slurm" in r.stderr
    assert not (tmp_path / "runs").exists()
