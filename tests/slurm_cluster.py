"""A real single-node SLURM cluster for tests: munged + slurmctld + slurmd (+ optionally MariaDB + slurmdbd).

Everything lives in one temporary directory: the munge key and socket, slurm.conf, state and spool
directories, the daemons' logs. The daemons run in the foreground (`-D`) as child processes owned by the
fixture, on free TCP ports, so that the cluster does not touch /etc/slurm, /etc/munge or a system munged
and two of them can run side by side. Client commands find the cluster through `SLURM_CONF` (the
fixture sets it in `os.environ` for the session; `cluster.env` is a copy for subprocesses).

Two flavours:

* `slurm_cluster` -- no accounting database. Job state comes from `squeue` / `scontrol show job`
  (finished jobs are kept for `MinJobAge` = 1 day) and from the job-completion log
  (`JobCompType=jobcomp/filetxt`), which `sacct --completion` (`sacct -c`) reads. Plain `sacct`
  answers "Slurm accounting storage is disabled" (exit 1) without slurmdbd.
* `slurm_cluster_accounting` -- adds a private MariaDB and slurmdbd, so that plain `sacct` works as on
  a production cluster (submitit polls job states with plain `sacct`). Costs mariadb-server + slurmdbd
  (apt, ~50 s once) and ~7 s at start (mariadb-install-db).

Needs root (slurmd runs jobs as the submitting user and the daemons run as SlurmUser=root). When not
root, or when the Debian packages are missing and cannot be installed (offline machine), the fixtures
skip with the reason; set IMITATION_NB_REQUIRE_SLURM=1 to turn that skip into a failure (CI).

Use from a test module (pytest puts tests/ on sys.path; the session fixture must be imported too):
    from slurm_cluster import slurm_cluster, slurm_session  # noqa: F401  (pytest fixtures)
    from slurm_cluster import slurm_cluster_accounting, slurm_accounting_session  # noqa: F401
or as a library: ``with SlurmCluster.start() as c: c.sbatch("--wrap", "hostname")`` (after ensure_installed()).
"""
from __future__ import annotations

import atexit, contextlib, os, re, secrets, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
SLURM_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel",
                  "sinfo", "sacct")
ACCOUNTING_BINARIES = ("slurmdbd", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb-admin")
REQUIRE_ENV = "IMITATION_NB_REQUIRE_SLURM"
MARKER_ENV = "IMITATION_NB_SLURM_FIXTURE"      # set in the daemons' environment (inherited by slurmstepd)
NODE = "localhost"
PARTITION = "debug"
# job states after which a job will not change any more
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})


class SlurmUnavailable(Exception):
    "SLURM cannot run on this machine (not root, packages not installable): a reason to skip, not a bug."


def _run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _missing(binaries):
    return [b for b in binaries if shutil.which(b) is None]


def ensure_installed(accounting: bool = False, log=print) -> float:
    """Make the SLURM (and, with `accounting`, slurmdbd + MariaDB) binaries available, installing the Debian
    packages with apt-get when running as root. Returns the seconds spent installing (0 if nothing to do).
    Raises SlurmUnavailable with the reason when that is not possible."""
    need = SLURM_BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    missing = _missing(need)
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"the SLURM test cluster needs root (uid is {os.geteuid()}): slurmd launches jobs as the submitting "
            f"user and the daemons run with SlurmUser=root" + (f"; also missing: {' '.join(missing)}" if missing else ""))
    if not missing: return 0.0
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {' '.join(missing)} and no apt-get to install them (Debian/Ubuntu only)")
    pkgs = SLURM_PACKAGES + (ACCOUNTING_PACKAGES if accounting else ())
    log(f"slurm test cluster: installing {' '.join(pkgs)} with apt-get (missing: {' '.join(missing)})")
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *pkgs]):
        try: r = _run(cmd, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish in 900 s (offline machine?)") from None
        if r.returncode:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {r.returncode}; offline machine?):\n{tail}")
    still = _missing(need)
    if still: raise SlurmUnavailable(f"installed {' '.join(pkgs)} but still missing: {' '.join(still)}")
    return time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def node_hardware() -> dict:
    "The node's CPUs/sockets/cores/threads/RealMemory as slurmd detects them (`slurmd -C`)."
    r = _run(["slurmd", "-C"], timeout=60)
    line = next((l for l in r.stdout.splitlines() if l.startswith("NodeName=")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"`slurmd -C` failed (exit {r.returncode}): {r.stdout}{r.stderr}")
    hw = dict(tok.split("=", 1) for tok in line.split())
    hw.pop("NodeName")
    return hw


def parse_scontrol(line: str) -> dict:
    "Parse one line of `scontrol -o show job`: Key=Value pairs separated by spaces (values may hold '=' and ',')."
    out = {}
    for tok in re.split(r" (?=[A-Za-z][A-Za-z_:/]*=)", line.strip()):
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


class SlurmCluster:
    """A running single-node cluster. Attributes: root (temp dir), conf (slurm.conf path), env (environment for
    client subprocesses), accounting (slurmdbd running), node, partition, cpus, cluster_name, start_seconds."""

    def __init__(self, root: Path, accounting: bool):
        self.root, self.accounting = Path(root), accounting
        self.cluster_name = "imnb" + secrets.token_hex(4)
        self.conf = self.root / "etc" / "slurm.conf"
        self.node, self.partition = NODE, PARTITION
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self.start_seconds = None
        self.timings: dict[str, float] = {}      # seconds spent in each startup wait
        self.cpus = None
        self._stopped = False

    # ---------------------------------------------------------------- start
    @classmethod
    def start(cls, accounting: bool = False, timeout: float = 60.0) -> "SlurmCluster":
        "Start munged, (MariaDB, slurmdbd,) slurmctld and slurmd; return once the node is idle."
        t0 = time.monotonic()
        root = Path(tempfile.mkdtemp(prefix="imnb-slurm-"))
        os.chmod(root, 0o755)       # munged wants every directory above its socket searchable by all
        c = cls(root, accounting)
        atexit.register(c.stop)
        try:
            c._start(timeout)
        except BaseException as e:
            logs = c.logs()
            c.stop()
            raise RuntimeError(f"the SLURM test cluster did not start: {type(e).__name__}: {e}\n{logs}") from None
        c.start_seconds = time.monotonic() - t0
        return c

    def _popen(self, name, cmd, env=None):
        log = open(self.root / "log" / f"{name}.out", "ab")
        denv = {**self.env, MARKER_ENV: str(self.root), **(env or {})}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=denv, cwd=self.root, start_new_session=True)
        log.close()

    def _check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode} during startup")

    def _wait(self, what, ok, deadline):
        t0 = time.monotonic()
        while True:
            self._check_alive()
            if ok():
                self.timings[what] = round(time.monotonic() - t0, 2)
                return
            if time.monotonic() > deadline: raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def _start(self, timeout):
        deadline = time.monotonic() + timeout
        R = self.root
        for d in ("etc", "state", "spool", "log", "run", "munge", "jobs"): (R / d).mkdir()
        os.chmod(R / "munge", 0o700); os.chmod(R / "run", 0o755)
        key = R / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024)); os.chmod(key, 0o400)
        self.munge_socket = R / "run" / "munge.sock"
        self._popen("munged", ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={R / 'run' / 'munged.pid'}", f"--seed-file={R / 'munge' / 'seed'}",
                               f"--log-file={R / 'log' / 'munged.log'}", "--num-threads=4"])
        self._wait("munged", lambda: self.munge_socket.exists() and
                   _run(["munge", "-n", "-S", str(self.munge_socket)], timeout=10).returncode == 0, deadline)

        hw = node_hardware()
        self.cpus = int(hw["CPUs"])
        self.ports = {k: _free_port() for k in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
        self.conf.write_text(self.slurm_conf_text(hw))      # sacctmgr (accounting) reads it before slurmctld runs
        if self.accounting:
            self._start_accounting(deadline)
        self._popen("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._popen("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait("slurmctld to listen", lambda: _port_open(self.ports["slurmctld"]), deadline)
        self._wait(f"node {self.node} to be idle in sinfo", lambda: self.node_state() == "idle", deadline)

    def _start_accounting(self, deadline):
        R = self.root
        db = R / "mariadb"
        t0 = time.monotonic()
        r = _run(["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                  "--auth-root-authentication-method=normal", "--skip-test-db"], timeout=120)
        (R / "log" / "mariadb-install-db.out").write_text(r.stdout + r.stderr)
        if r.returncode: raise RuntimeError(f"mariadb-install-db failed (exit {r.returncode})")
        self.timings["mariadb-install-db"] = round(time.monotonic() - t0, 2)
        sock = R / "run" / "mariadb.sock"
        self._popen("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={db}", "--user=root",
                                 f"--socket={sock}", f"--port={self.ports['mariadb']}", "--bind-address=127.0.0.1",
                                 f"--pid-file={R / 'run' / 'mariadb.pid'}", f"--log-error={R / 'log' / 'mariadb.log'}",
                                 "--skip-name-resolve", "--innodb-buffer-pool-size=64M",
                                 "--innodb-lock-wait-timeout=900"])
        self._wait("mariadbd", lambda: _run(["mariadb-admin", f"--socket={sock}", "-uroot", "ping"],
                                            timeout=10).returncode == 0, deadline)
        dbd = R / "etc" / "slurmdbd.conf"       # slurmdbd reads it next to $SLURM_CONF; must be mode 600
        dbd.write_text(self.slurmdbd_conf_text())
        os.chmod(dbd, 0o600)
        self._popen("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]) and
                   self.run("sacctmgr", "-n", "-P", "list", "tres", check=False, timeout=10).stdout.strip() != "",
                   deadline)

    def slurm_conf_text(self, hw: dict) -> str:
        R, P = self.root, self.ports
        node = " ".join(f"{k}={v}" for k, v in hw.items() if k != "UpTime")
        if self.accounting:
            acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
                    f"AccountingStoragePort={P['slurmdbd']}\n"
                    # the munge socket slurmctld/sacct/sacctmgr use towards slurmdbd (AuthInfo is not used there)
                    f"AccountingStoragePass={self.munge_socket}\n")
        else:
            acct = "AccountingStorageType=accounting_storage/none\n"
        return f"""\
# generated by tests/slurm_cluster.py: a single-node test cluster in {R}
ClusterName={self.cluster_name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={P['slurmctld']}
SlurmdPort={P['slurmd']}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={R}/state
SlurmdSpoolDir={R}/spool
SlurmctldPidFile={R}/run/slurmctld.pid
SlurmdPidFile={R}/run/slurmd.pid
SlurmctldLogFile={R}/log/slurmctld.log
SlurmdLogFile={R}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
{acct}JobCompType=jobcomp/filetxt
JobCompLoc={R}/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=86400
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
InactiveLimit=0
KillWait=2
Waittime=0
MessageTimeout=10
NodeName={self.node} NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def slurmdbd_conf_text(self) -> str:
        R, P = self.root, self.ports
        return f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={P['slurmdbd']}
SlurmUser=root
DebugLevel=info
LogFile={R}/log/slurmdbd.log
PidFile={R}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={P['mariadb']}
StorageUser=root
StorageLoc=slurm_acct_db
"""

    # ---------------------------------------------------------------- client helpers
    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        "Run a client command (sbatch, squeue, ...) against this cluster."
        r = _run([str(c) for c in cmd], timeout=timeout, env=self.env)
        if check and r.returncode:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def sbatch(self, *args) -> str:
        "Submit with `sbatch --parsable ARGS`; returns the job id."
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        jid = out.split(";")[0]
        if not jid.isdigit(): raise RuntimeError(f"unexpected sbatch output {out!r}")
        return jid

    def node_state(self) -> str:
        try:
            r = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return r.stdout.strip()

    def job(self, jid) -> dict:
        "`scontrol show job` as a dict (JobState, Reason, ExitCode, StartTime, EndTime, StdOut, ...)."
        r = self.run("scontrol", "-o", "show", "job", str(jid))
        return parse_scontrol(r.stdout.splitlines()[0])

    def state(self, jid) -> str:
        return self.job(jid)["JobState"]

    def wait(self, jid, timeout=60.0, until=FINISHED_STATES, never_satisfied=True) -> dict:
        """Poll `scontrol show job` until the job's state is in `until`; with `never_satisfied`, a job left
        PENDING with Reason=DependencyNeverSatisfied (slurm's default for a failed afterok) also ends the wait."""
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(jid)
            if j["JobState"] in until: return j
            if never_satisfied and j["JobState"] == "PENDING" and j.get("Reason") == "DependencyNeverSatisfied":
                return j
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jid} still {j['JobState']} ({j.get('Reason')}) after {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def sacct(self, *jids, fields=("JobID", "JobName", "State", "ExitCode", "Start", "End")) -> list[dict]:
        """Finished-job records: plain `sacct` with slurmdbd, `sacct --completion` (job-completion log)
        without. Job steps (`1.batch`) only appear with slurmdbd."""
        cmd = ["sacct", "--parsable2", "--noheader", "--starttime=2000-01-01", "--format=" + ",".join(fields)]
        if not self.accounting: cmd.append("--completion")
        for j in jids: cmd += ["-j", str(j)]
        out = self.run(*cmd).stdout
        return [dict(zip(fields, l.split("|"))) for l in out.splitlines() if l.strip()]

    def logs(self, lines=60) -> str:
        "The tail of every daemon log, for failure messages."
        parts = []
        for f in sorted((self.root / "log").glob("*")) if (self.root / "log").exists() else []:
            try: text = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError: continue
            parts.append(f"----- {f} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(parts) or f"(no logs under {self.root})"

    # ---------------------------------------------------------------- stop
    def leftover_pids(self) -> list[int]:
        """Processes of this cluster: daemons (marker in their environment, inherited by slurmstepd) and job
        processes (SLURM_CLUSTER_NAME=<this cluster> set by slurmstepd)."""
        keys = (f"{MARKER_ENV}={self.root}".encode(), f"SLURM_CLUSTER_NAME={self.cluster_name}".encode())
        me, pids = os.getpid(), []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me: continue
            try: env = (p / "environ").read_bytes().split(b"\0")
            except OSError: continue
            if any(k in env for k in keys): pids.append(int(p.name))
        return pids

    def stop(self, keep_dir: bool = False):
        "Cancel all jobs, stop the daemons (SIGTERM, SIGKILL after 10 s), kill leftovers, remove the directory."
        if self._stopped: return
        self._stopped = True
        with contextlib.suppress(Exception):
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout=15).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=15)
                    end = time.monotonic() + 10
                    while time.monotonic() < end and self.run("squeue", "-h", "-t", "R,CG", "-o", "%A", check=False,
                                                              timeout=15).stdout.strip():
                        time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None: continue
            p.terminate()
            try: p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill(); p.wait(10)
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError): os.kill(pid, signal.SIGKILL)
        if not keep_dir: shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()


# -------------------------------------------------------------------- pytest fixtures
def _cluster_or_skip(accounting):
    import pytest
    try:
        secs = ensure_installed(accounting, log=lambda m: print(m, file=sys.stderr))
    except SlurmUnavailable as e:
        if os.environ.get(REQUIRE_ENV): pytest.fail(f"{REQUIRE_ENV} is set but: {e}", pytrace=False)
        pytest.skip(f"no SLURM test cluster: {e}")
    c = SlurmCluster.start(accounting=accounting)
    c.install_seconds = secs
    print(f"slurm test cluster ({'with slurmdbd' if accounting else 'no accounting db'}): install {secs:.1f} s, "
          f"start {c.start_seconds:.1f} s, conf {c.conf}", file=sys.stderr)
    return c


@contextlib.contextmanager
def _session_cluster(accounting):
    c = _cluster_or_skip(accounting)
    try: yield c
    finally: c.stop()


try:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_session():
        with _session_cluster(accounting=False) as c: yield c

    @pytest.fixture(scope="session")
    def slurm_accounting_session():
        with _session_cluster(accounting=True) as c: yield c

    @pytest.fixture
    def slurm_cluster(slurm_session, monkeypatch):
        """The session's single-node cluster without accounting database (state from scontrol/squeue and
        `sacct --completion`); SLURM_CONF points at it in os.environ for the test."""
        monkeypatch.setenv("SLURM_CONF", str(slurm_session.conf))
        return slurm_session

    @pytest.fixture
    def slurm_cluster_accounting(slurm_accounting_session, monkeypatch):
        "The session's single-node cluster with MariaDB + slurmdbd (plain `sacct` works); SLURM_CONF set."
        monkeypatch.setenv("SLURM_CONF", str(slurm_accounting_session.conf))
        return slurm_accounting_session
except ImportError:       # used as a library without pytest
    pass
