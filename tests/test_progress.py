"""Issue 22: what the main job shows. Real stage runs (the driver's fixture stage notebook, executed by papermill in real
kernels) through `reproduce.run_plan`, in a separate process whose whole terminal output (stdout + stderr) is checked:
no kernel transport warning, one line per event with the progress counters, key results, failures with their last
lines, `--quiet`."""
import json, os, re, subprocess, sys, textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NB = "../tests/reproduce_fixtures/stage_fixture.ipynb"   # relative to nbs/

DRIVER = textwrap.dedent('''
    import sys, json
    from pathlib import Path
    from imitation_nb import reproduce as R
    from imitation_nb import stages as S
    S.STAGES["fixture"] = S.Stage("fixture", {nb!r}, "fixture:run_fixture", None)
    root = Path({root!r})
    def mk(name, value, deps=(), fail=False):
        params = {{"profile": "t", "value": value, "sleep_s": 0.0, "fail": fail, "upstream": None}}
        return R.StagePlan("fixture", params, list(deps), name, root / "t" / "fixture" / name)
    a = mk("a", 1.0); b = mk("b", 2.0, [a.key]); d = mk("d", 4.0, fail=True); e = mk("e", 5.0, [d.key])
    P = [a, b, d, e]
    progress = None
    if {reporter!r}:
        from imitation_nb.progress import PlanProgress, read_history
        progress = PlanProgress(P, history=read_history(P), quiet={quiet!r})
    st = R.run_plan(P, parallel=1, **({{"progress": progress}} if progress else {{}}))
    if progress: progress.close()
    st.pop("_times"); print("STATE " + json.dumps(st))
''')


def drive(tmp_path, reporter=True, quiet=False) -> str:
    "Run the driver in a fresh process (stdout is a pipe: plain mode); its whole terminal output, stdout + stderr."
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(nb=FIXTURE_NB, root=str(tmp_path / "runs"), reporter=reporter, quiet=quiet))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert "STATE " in r.stdout, out[-3000:]
    return out


def test_stage_kernels_print_no_transport_warning(tmp_path):
    "The stage kernels start encrypted and keep their own log: the driver's output has no kernel line at all."
    out = drive(tmp_path, reporter=False)
    assert "[done] b" in out and "[FAILED] fixture:d" in out                     # four real kernels ran
    assert "without encryption" not in out and "[IPKernelApp]" not in out, out
    log = tmp_path / "runs" / "t" / "fixture" / "a" / "kernel.log"
    assert log.exists() and "without encryption" not in log.read_text()


def test_plain_progress_one_line_per_event_with_results_and_failure_tail(tmp_path):
    out = drive(tmp_path)
    assert "\r" not in out and "\x1b[" not in out and "without encryption" not in out
    lines = [l for l in out.splitlines() if not l.startswith("STATE ")]
    head = [l for l in lines if l.startswith("[")]
    assert re.fullmatch(r"\[0/4 · \d+s · ETA \?\] start  fixture: a", head[0]), head
    assert re.fullmatch(r"\[1/4 · \d+s · ETA \S+\] done   fixture: a in \d+s · fixture 1 \(n=1\)", head[1]), head
    assert re.fullmatch(r"\[2/4 · \d+s · ETA \S+\] done   fixture: b in \d+s · fixture 2 \(n=1\)", head[3]), head
    assert any(re.fullmatch(r"\[2/4 · \d+s · ETA \S+\] FAILED fixture: d", l) for l in head), head
    assert any(l.endswith("blocked fixture: e: an upstream run failed") for l in head), head
    i = lines.index(next(l for l in lines if "FAILED fixture: d" in l))
    assert lines[i + 1].startswith("    fixture:d failed after") and "last lines of the error:" in lines[i + 3]
    assert any(l == "    | RuntimeError: fixture asked to fail" for l in lines[i:]), lines[i:]
    st = json.loads(out.split("STATE ", 1)[1].splitlines()[0])
    assert st == {"fixture:a": "done", "fixture:b": "done", "fixture:d": "failed", "fixture:e": "blocked"}
    # a second run: a and b are done (one line), d runs again with an ETA from the first run's measured times
    again = [l for l in drive(tmp_path).splitlines() if l.startswith("[")]
    assert again[0].endswith("2 stage runs already done: skipped") and "ETA ?" not in again[1], again


def test_quiet_shows_only_failures(tmp_path):
    out = drive(tmp_path, quiet=True)
    lines = [l for l in out.splitlines() if not l.startswith("STATE ")]
    assert re.fullmatch(r"\[2/4 · \d+s · ETA \S+\] FAILED fixture: d", lines[0]), lines
    assert all(l.startswith("    ") for l in lines[1:]), lines          # the failure's message and last lines only
    assert "done " not in out and "start " not in out and "without encryption" not in out


def test_reproduce_command_plain_then_quiet(tmp_path):
    "`imitation-nb reproduce` with the reporter: a real stage of the smoke plan (`--only nq_synthetic`), then `--quiet`."
    def run(*flags):
        r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())", "reproduce",
                            "--profile", "smoke", "--runs", str(tmp_path), "--only", "nq_synthetic", *flags], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr
    out = run("--plain")
    lines = [l for l in out.splitlines() if l.startswith("[")]
    assert [l.split("] ", 1)[1] for l in lines][0] == "start  nq_synthetic: NQ-synthetic via the teacher", lines
    assert re.fullmatch(r"\[1/1 · \d+s · ETA 0s\] done   nq_synthetic: NQ-synthetic via the teacher in \d+s", lines[1]), lines
    assert "elapsed per stage" in out and "without encryption" not in out and "\r" not in out
    quiet = run("--quiet", "--force")
    assert [l for l in quiet.splitlines() if l.strip()] == [l for l in quiet.splitlines() if l.startswith("total ")], quiet
