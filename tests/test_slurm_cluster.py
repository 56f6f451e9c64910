"""A real single-node SLURM cluster (tests/slurm_cluster.py) does what the grid's SLURM executor will rely on:
batch jobs, afterok/afterany dependencies, what happens to dependants of a failed or cancelled job, output
paths, environment propagation, a job running the project's Python, job state after the job ended (scontrol,
sacct), and a clean teardown. Facts recorded here are those of the Debian slurm 22.05 packages."""
import os, pwd, subprocess, sys, time
from pathlib import Path

import pytest

import slurm_cluster as SC
from slurm_cluster import (slurm_cluster, slurm_session, slurm_cluster_accounting,  # noqa: F401  (pytest fixtures)
                           slurm_accounting_session)


def read_float(p: Path) -> float:
    return float(p.read_text().strip())


def wait_for(what, ok, timeout=30.0):
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end: raise TimeoutError(what)
        time.sleep(0.2)


def sacct_when(cluster, jid, state, timeout=30.0):
    "The sacct record of job `jid` once it shows `state` (records reach slurmdbd asynchronously)."
    recs = []
    def ok():
        nonlocal recs
        recs = [r for r in cluster.sacct(jid) if r["JobID"] == str(jid)]
        return bool(recs) and recs[0]["State"].split()[0] == state
    wait_for(f"sacct shows job {jid} {state}: {recs}", ok, timeout)
    return recs[0]


def pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    st = Path(f"/proc/{pid}/stat")
    return st.exists() and st.read_text().split(")")[-1].split()[0] != "Z"     # a zombie has ended


# ------------------------------------------------------------------ (1) a job runs, its state stays readable
def test_batch_job_runs_writes_file_and_stays_readable_after_completion(slurm_cluster, tmp_path):
    c = slurm_cluster
    assert os.environ["SLURM_CONF"] == str(c.conf)
    assert c.node_state() == "idle"
    jid = c.sbatch("--chdir", tmp_path, "--job-name", "imnb-write",
                   "--wrap", 'echo "$SLURM_JOB_ID on $SLURMD_NODENAME" > written.txt')
    j = c.wait(jid)
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", j
    assert (tmp_path / "written.txt").read_text() == f"{jid} on {c.node}\n"
    # finished jobs stay visible to squeue -t all and scontrol for MinJobAge (1 day here; 300 s by default!)
    sq = c.run("squeue", "-h", "-t", "all", "-j", jid, "-o", "%i %T %j").stdout.split()
    assert sq == [jid, "COMPLETED", "imnb-write"]
    # without slurmdbd, sacct reads the job-completion log with --completion
    rec = [r for r in c.sacct(jid) if r["JobID"] == jid]
    assert rec and rec[0]["State"] == "COMPLETED" and rec[0]["ExitCode"] == "0:0" and rec[0]["JobName"] == "imnb-write"


def test_plain_sacct_needs_slurmdbd_sacct_completion_does_not(slurm_cluster, tmp_path):
    c = slurm_cluster
    jid = c.sbatch("--chdir", tmp_path, "--wrap", "true")
    c.wait(jid)
    r = c.run("sacct", "-j", jid, "--parsable2", check=False)
    assert r.returncode != 0 and "accounting storage is disabled" in (r.stdout + r.stderr), r
    r = c.run("sacct", "--completion", "-j", jid, "--starttime=2000-01-01", "--parsable2", "--noheader",
              "--format=JobID,State")
    assert r.stdout.split() == [f"{jid}|COMPLETED"]


# ------------------------------------------------------------------ (2) afterok runs in order
def test_afterok_dependant_waits_and_starts_after_its_parent_ends(slurm_cluster, tmp_path):
    c = slurm_cluster
    a = c.sbatch("--chdir", tmp_path, "--wrap", "date +%s.%N > a_start; sleep 3; date +%s.%N > a_end")
    b = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{a}", "--wrap", "date +%s.%N > b_start")
    jb = c.job(b)
    assert jb["JobState"] == "PENDING" and jb["Reason"] == "Dependency" and jb["Dependency"].startswith(f"afterok:{a}")
    assert c.wait(b)["JobState"] == "COMPLETED"
    assert c.state(a) == "COMPLETED"
    assert read_float(tmp_path / "a_start") + 3 <= read_float(tmp_path / "a_end") <= read_float(tmp_path / "b_start")


# ------------------------------------------------------------------ (3) a failed job and its dependants
def test_failed_job_dependants_default_pending_forever_kill_on_invalid_dep_cancels(slurm_cluster, tmp_path):
    c = slurm_cluster
    fail = c.sbatch("--chdir", tmp_path, "--wrap", "echo started > fail_ran; exit 3")
    dep = lambda kind, name, *extra: c.sbatch("--chdir", tmp_path, f"--dependency={kind}:{fail}", *extra,
                                              "--wrap", f"touch {name}")
    default = dep("afterok", "default_ran")
    killed = dep("afterok", "killed_ran", "--kill-on-invalid-dep=yes")
    anyway = dep("afterany", "afterany_ran")
    notok = dep("afternotok", "afternotok_ran")
    j = c.wait(fail)
    assert (j["JobState"], j["Reason"], j["ExitCode"]) == ("FAILED", "NonZeroExitCode", "3:0")
    assert (tmp_path / "fail_ran").exists()
    jk = c.wait(killed)
    assert (jk["JobState"], jk["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), jk
    assert c.wait(anyway)["JobState"] == "COMPLETED" and c.wait(notok)["JobState"] == "COMPLETED"
    # slurm 22.05's default (DependencyParameters unset): the afterok dependant is NOT cancelled; it stays
    # PENDING with Reason=DependencyNeverSatisfied until someone scancels it.
    time.sleep(2)
    jd = c.job(default)
    assert (jd["JobState"], jd["Reason"], jd["Dependency"]) == ("PENDING", "DependencyNeverSatisfied",
                                                                 f"afterok:{fail}(failed)"), jd
    assert not (tmp_path / "default_ran").exists() and not (tmp_path / "killed_ran").exists()
    assert (tmp_path / "afterany_ran").exists() and (tmp_path / "afternotok_ran").exists()
    c.run("scancel", default)
    assert c.wait(default)["JobState"] == "CANCELLED"
    recs = {r["JobID"]: r["State"] for r in c.sacct(fail, killed, default)}
    assert recs == {fail: "FAILED", killed: "CANCELLED", default: "CANCELLED"}, recs


# ------------------------------------------------------------------ (4) scancel of running and pending jobs
def test_scancel_running_job_kills_it_and_settles_its_dependants(slurm_cluster, tmp_path):
    c = slurm_cluster
    run = c.sbatch("--chdir", tmp_path, "--wrap", "echo $$ > pid; exec sleep 300")
    ok_default = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{run}", "--wrap", "touch ok_ran")
    ok_kill = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{run}", "--kill-on-invalid-dep=yes",
                       "--wrap", "touch ok_kill_ran")
    anyway = c.sbatch("--chdir", tmp_path, f"--dependency=afterany:{run}", "--wrap", "touch any_ran")
    c.wait(run, until={"RUNNING"})
    wait_for("job wrote its pid", lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip())
    pid = int((tmp_path / "pid").read_text())
    assert pid_alive(pid)
    c.run("scancel", run)
    j = c.wait(run)
    assert j["JobState"] == "CANCELLED" and j["ExitCode"] == "0:15", j       # killed by SIGTERM
    wait_for(f"the job's process {pid} is gone", lambda: not pid_alive(pid), timeout=15)
    assert c.wait(ok_kill)["JobState"] == "CANCELLED"
    assert c.wait(anyway)["JobState"] == "COMPLETED" and (tmp_path / "any_ran").exists()
    jd = c.job(ok_default)
    assert (jd["JobState"], jd["Reason"]) == ("PENDING", "DependencyNeverSatisfied"), jd
    c.run("scancel", ok_default)
    assert c.wait(ok_default)["JobState"] == "CANCELLED"
    assert not (tmp_path / "ok_ran").exists() and not (tmp_path / "ok_kill_ran").exists()


def test_scancel_pending_job_never_runs_and_its_dependant_is_cancelled(slurm_cluster, tmp_path):
    c = slurm_cluster
    blocker = c.sbatch("--chdir", tmp_path, "--wrap", "sleep 300")
    pend = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{blocker}", "--wrap", "touch pend_ran")
    child = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{pend}", "--kill-on-invalid-dep=yes",
                     "--wrap", "touch child_ran")
    c.wait(blocker, until={"RUNNING"})
    assert c.state(pend) == "PENDING"
    c.run("scancel", pend)
    jp = c.wait(pend)
    assert jp["JobState"] == "CANCELLED" and jp["StartTime"] == jp["EndTime"], jp   # never started
    assert c.wait(child)["JobState"] == "CANCELLED"
    assert c.state(blocker) == "RUNNING"          # cancelling a dependant does not touch its parent
    c.run("scancel", blocker)
    assert c.wait(blocker)["JobState"] == "CANCELLED"
    assert not (tmp_path / "pend_ran").exists() and not (tmp_path / "child_ran").exists()


# ------------------------------------------------------------------ (5) --output / --error
def test_stdout_and_stderr_land_in_the_paths_given(slurm_cluster, tmp_path):
    c = slurm_cluster
    logs = tmp_path / "logs"
    logs.mkdir()
    jid = c.sbatch("--chdir", tmp_path, "--output", logs / "out-%j.log", "--error", logs / "err-%j.log",
                   "--wrap", "echo to-stdout; echo to-stderr >&2; exit 0")
    j = c.wait(jid)
    assert j["JobState"] == "COMPLETED"
    out, err = logs / f"out-{jid}.log", logs / f"err-{jid}.log"
    assert (j["StdOut"], j["StdErr"]) == (str(out), str(err))
    assert out.read_text() == "to-stdout\n" and err.read_text() == "to-stderr\n"
    assert not list(tmp_path.glob("slurm-*.out"))


# ------------------------------------------------------------------ (6) environment and the project's python
def test_export_all_propagates_the_submitters_environment_a_list_does_not(slurm_cluster, tmp_path):
    c = slurm_cluster
    env = {**c.env, "IMNB_FROM_SUBMITTER": "submitter value", "PATH": f"/imnb-marker-dir:{c.env['PATH']}"}
    script = "echo \"A=${IMNB_FROM_SUBMITTER-unset} B=${IMNB_EXTRA-unset} P=${PATH%%:*}\""
    def submit(export, name):
        r = subprocess.run(["sbatch", "--parsable", f"--export={export}", "--chdir", str(tmp_path), "-o",
                            str(tmp_path / name), "--wrap", script], env=env, capture_output=True, text=True, check=True)
        assert c.wait(r.stdout.strip())["JobState"] == "COMPLETED"
        return (tmp_path / name).read_text().strip()
    assert submit("ALL", "all") == "A=submitter value B=unset P=/imnb-marker-dir"
    assert submit("ALL,IMNB_EXTRA=x y", "allplus") == "A=submitter value B=x y P=/imnb-marker-dir"
    # a list without ALL (and NONE): only those variables, on top of the user's login environment on the
    # node (--get-user-env): the submitter's PATH (so its venv) is gone
    only = submit("IMNB_EXTRA=z", "only")
    assert only.startswith("A=unset B=z P=") and "/imnb-marker-dir" not in only


def test_job_runs_the_project_python_and_imports_the_package(slurm_cluster, tmp_path):
    import imitation_nb
    c = slurm_cluster
    code = ("import sys, imitation_nb, imitation_nb.core; "
            "print(sys.executable); print(sys.prefix); print(imitation_nb.__file__)")
    jid = c.sbatch("--chdir", tmp_path, "-o", tmp_path / "py.out", "-e", tmp_path / "py.err",
                   "--wrap", f"{sys.executable} -c '{code}'")
    j = c.wait(jid)
    assert j["JobState"] == "COMPLETED", (j, (tmp_path / "py.err").read_text())
    exe, prefix, mod = (tmp_path / "py.out").read_text().split()
    assert (exe, prefix, mod) == (sys.executable, sys.prefix, imitation_nb.__file__)
    assert c.job(jid)["UserId"] == f"{pwd.getpwuid(os.getuid()).pw_name}({os.getuid()})"     # runs as the submitter


# ------------------------------------------------------------------ accounting flavour: plain sacct
def test_slurmdbd_cluster_plain_sacct_reports_finished_jobs_and_steps(slurm_cluster_accounting, tmp_path):
    c = slurm_cluster_accounting
    ok = c.sbatch("--chdir", tmp_path, "--wrap", "true")
    bad = c.sbatch("--chdir", tmp_path, "--wrap", "exit 3")
    dep = c.sbatch("--chdir", tmp_path, f"--dependency=afterok:{bad}", "--kill-on-invalid-dep=yes", "--wrap", "true")
    for j in (ok, bad, dep): c.wait(j)
    assert sacct_when(c, ok, "COMPLETED")["ExitCode"] == "0:0"
    assert sacct_when(c, bad, "FAILED")["ExitCode"] == "3:0"
    assert sacct_when(c, dep, "CANCELLED")
    # the exact command submitit's watcher runs
    out = c.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", ok, "-j", bad).stdout.splitlines()
    assert out[0] == "JobID|State|NodeList"
    assert {f"{ok}|COMPLETED|localhost", f"{ok}.batch|COMPLETED|localhost", f"{bad}|FAILED|localhost"} <= set(out[1:])


# ------------------------------------------------------------------ submitit against both flavours
# submitit pickles functions by reference: they must be importable in the job (this test module is not)
from math import sqrt as _submitit_fail     # sqrt(-1) raises ValueError("math domain error") in the job
from operator import mul as _submitit_mul


def test_submitit_with_slurmdbd_results_dependencies_errors_and_states(slurm_cluster_accounting, tmp_path):
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (not a project dependency)")
    submitit.SlurmJob.watcher.clear()       # one process-wide cache keyed by job id; each cluster counts from 1
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster_accounting.partition, cpus_per_task=1)
    a = ex.submit(_submitit_mul, 7, 7)
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{a.job_id}"})
    b = ex.submit(_submitit_mul, 8, 8)
    assert (a.result(), b.result()) == (49, 64)
    assert f"#SBATCH --dependency=afterok:{a.job_id}\n" in (tmp_path / b.job_id / f"{b.job_id}_submission.sh").read_text()
    ja, jb = slurm_cluster_accounting.job(a.job_id), slurm_cluster_accounting.job(b.job_id)
    assert ja["EndTime"] <= jb["StartTime"]
    wait_for("submitit sees COMPLETED", lambda: a.get_info(mode="force").get("State") == "COMPLETED")
    f = ex.submit(_submitit_fail, -1)
    with pytest.raises(submitit.core.utils.FailedJobError, match="math domain error"):
        f.result()
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{f.job_id}", "kill-on-invalid-dep": "yes"})
    never = ex.submit(_submitit_mul, 9, 9)
    # the dependant never runs, so it writes no result: only sacct can tell submitit it is over, and the
    # watcher polls sacct at 2 s, 4 s, 8 s ... after the last submission (up to every 600 s for SlurmJob)
    t0 = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        never.result()
    print(f"submitit noticed the cancelled dependant after {time.monotonic() - t0:.1f} s")


def test_submitit_without_slurmdbd_cannot_see_a_job_that_never_ran(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (not a project dependency)")
    submitit.SlurmJob.watcher.clear()       # one process-wide cache keyed by job id; each cluster counts from 1
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition)
    a = ex.submit(_submitit_mul, 5, 5)
    assert a.result() == 25                           # results come from the pickle the job writes
    assert a.get_info(mode="force") == {}             # sacct fails: no state at all ("UNKNOWN")
    assert a.state == "UNKNOWN"
    f = ex.submit(_submitit_fail, -1)
    with pytest.raises(submitit.core.utils.FailedJobError):
        f.result()
    ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{f.job_id}", "kill-on-invalid-dep": "yes"})
    never = ex.submit(_submitit_mul, 9, 9)
    assert slurm_cluster.wait(never.job_id)["JobState"] == "CANCELLED"
    time.sleep(3)
    assert not never.done(force_check=True)           # submitit would wait for it forever
    assert never.state == "UNKNOWN"


# ------------------------------------------------------------------ the fixture itself
def test_stop_kills_running_jobs_and_daemons_and_removes_everything(tmp_path):
    try: SC.ensure_installed()
    except SC.SlurmUnavailable as e: pytest.skip(str(e))
    c = SC.SlurmCluster.start()
    root, ports = c.root, dict(c.ports)
    try:
        jid = c.sbatch("--chdir", tmp_path, "--wrap", "echo $$ > pid; exec sleep 300")
        c.wait(jid, until={"RUNNING"})
        wait_for("pid file", lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip())
        pid = int((tmp_path / "pid").read_text())
        daemons = {n: p.pid for n, p in c.procs.items()}
        assert set(daemons) == {"munged", "slurmctld", "slurmd"}
        assert pid in c.leftover_pids() and set(daemons.values()) <= set(c.leftover_pids())
    finally:
        c.stop()
    assert not pid_alive(pid)
    assert all(not pid_alive(p) for p in daemons.values())
    assert all(p.returncode is not None for p in c.procs.values())
    assert c.leftover_pids() == []
    assert not root.exists()
    assert not any(SC._port_open(ports[k]) for k in ("slurmctld", "slurmd"))


def test_a_daemon_that_dies_at_startup_fails_fast_with_its_log(monkeypatch):
    try: SC.ensure_installed()
    except SC.SlurmUnavailable as e: pytest.skip(str(e))
    real = SC.SlurmCluster.slurm_conf_text
    monkeypatch.setattr(SC.SlurmCluster, "slurm_conf_text",
                        lambda self, hw: real(self, hw).replace("SelectType=select/cons_tres", "SelectType=select/bogus"))
    before = set(Path("/tmp").glob("imnb-slurm-*"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as ei:
        SC.SlurmCluster.start(timeout=60)
    msg = str(ei.value)
    assert time.monotonic() - t0 < 30
    assert "did not start: RuntimeError: slurmctld exited with code" in msg, msg[:500]
    assert "select/bogus" in msg and "slurmctld.log" in msg, msg[-3000:]
    assert set(Path("/tmp").glob("imnb-slurm-*")) == before          # nothing left behind


def test_not_root_skips_with_the_reason_and_require_env_fails(monkeypatch):
    monkeypatch.setattr(SC.os, "geteuid", lambda: 1000)
    with pytest.raises(SC.SlurmUnavailable, match="needs root"):
        SC.ensure_installed()
    monkeypatch.delenv(SC.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no SLURM test cluster: .*needs root"):
        SC._cluster_or_skip(False)
    monkeypatch.setenv(SC.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="IMITATION_NB_REQUIRE_SLURM is set but: .*needs root"):
        SC._cluster_or_skip(False)


def test_parse_scontrol_keeps_values_with_commas_and_equals():
    line = ("JobId=12 JobName=wrap JobState=PENDING Reason=Dependency Dependency=afterok:11(unfulfilled) "
            "TRES=cpu=1,node=1,billing=1 Command=(null) StdOut=/tmp/a b/out-12.log")
    d = SC.parse_scontrol(line)
    assert d["JobState"] == "PENDING" and d["TRES"] == "cpu=1,node=1,billing=1"
    assert d["StdOut"] == "/tmp/a b/out-12.log" and d["Dependency"] == "afterok:11(unfulfilled)"
