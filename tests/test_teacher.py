"""Teacher client, local server and NQ-synthetic: end-to-end, fault injection, kill -9, budget, replay, secrets.

The slow tests start `imitation-nb serve smollm2-135m-instruct` once (module fixture, ~30 s) on a free
loopback port and talk to it through the real `ChatClient` over HTTP, optionally via the fault-injecting
proxy in `tests/teacher_fixtures/fault_proxy.py`. Generation is kept short (16-64 new tokens) so that the
whole file runs in a few minutes on 2 CPU cores.
"""
import json, os, shutil, signal, sqlite3, subprocess, sys, time, uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_fixtures.fault_proxy import FaultProxy, DEFAULT_SCHEDULE  # noqa: E402

from imitation_nb.core import read_jsonl, read_manifest  # noqa: E402

MODEL = "smollm2-135m-instruct"
COMMITTED_CACHE = ROOT / "data" / "cache" / "nq_synthetic_smoke.sqlite"
COLLECT = Path(__file__).resolve().parent / "teacher_fixtures" / "collect.py"


def _env(**extra):
    env = dict(os.environ, IMITATION_NB_ROOT=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH"), str(ROOT)] if p])
    return env


def _cache_keys(path) -> set:
    if not Path(path).exists(): return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try: return {r[0] for r in db.execute("SELECT key FROM responses")}
    except sqlite3.OperationalError: return set()
    finally: db.close()


def _collector_cmd(run_dir, teacher: dict, nq: dict):
    code = ("import json, sys, logging; logging.basicConfig(level=logging.WARNING)\n"
            "from imitation_nb.nq_synthetic import run_nq_synthetic\n"
            f"run_nq_synthetic('smoke', {str(run_dir)!r}, teacher=json.loads({json.dumps(teacher)!r}), nq=json.loads({json.dumps(nq)!r}))\n")
    return [sys.executable, "-c", code]


def _check_output(run_dir):
    "The output file is consistent: valid conversation records, unique contiguous ids, matching audit."
    recs = read_jsonl(Path(run_dir) / "nq_synthetic.jsonl", strict=True)
    audit = json.loads((Path(run_dir) / "audit.json").read_text())
    assert [r["id"] for r in recs] == [f"nqsyn-{i:05d}" for i in range(len(recs))]
    assert audit["kept"] == len(recs)
    for r in recs:
        assert r["source"] == "nq_synthetic"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
    qs = [r["messages"][0]["content"].lower() for r in recs]
    assert len(set(qs)) == len(qs)
    return recs, audit


@pytest.fixture(scope="module")
def server():
    from imitation_nb.serve import start_server
    srv = start_server(MODEL, timeout=900, env=_env())
    yield srv
    srv.stop()


# --------------------------------------------------------------------------------------------------------
def test_replay_from_committed_cache_without_server(tmp_path):
    "The smoke NQ-synthetic stage replays fully offline from the committed recording: no server at all."
    from imitation_nb.nq_synthetic import run_nq_synthetic, stage_configs
    assert COMMITTED_CACHE.exists() and COMMITTED_CACHE.stat().st_size < 2_000_000
    before = COMMITTED_CACHE.read_bytes()
    run = run_nq_synthetic("smoke", tmp_path / "run", teacher={"offline": True, "local_server": None,
                                                       "base_url": "http://127.0.0.1:9/v1",
                                                       "cache_path": str(tmp_path / "rw.sqlite")}, progress=None)
    recs, audit = _check_output(run)
    _, _, ncfg = stage_configs("smoke")
    m = read_manifest(run)
    assert m["status"] == "done"
    assert m["extra"]["teacher_stats"]["requests_sent"] == 0 and m["extra"]["teacher_stats"]["api_calls"] == 0
    rounds = -(-audit["calls"] // ncfg.calls_per_round)                 # calls are sent in whole rounds
    assert m["extra"]["teacher_stats"]["replay_hits"] == rounds * ncfg.calls_per_round == len(_cache_keys(COMMITTED_CACHE))
    assert audit["status"] in ("done", "max_calls_reached") and len(recs) > 0
    assert audit["teacher_models"] == [MODEL]
    assert COMMITTED_CACHE.read_bytes() == before                       # the recording is never modified
    assert not Path(str(COMMITTED_CACHE) + "-wal").exists()
    # replay is deterministic: a second run writes the same file
    run2 = run_nq_synthetic("smoke", tmp_path / "run2", teacher={"offline": True, "local_server": None,
                                                         "cache_path": str(tmp_path / "rw2.sqlite")}, progress=None)
    assert (run2 / "nq_synthetic.jsonl").read_text() == (run / "nq_synthetic.jsonl").read_text()


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_papermill_and_secret(server, tmp_path):
    """The stage notebook, executed by papermill, generates pairs through the real HTTP client from the real
    local server; a fake API key in the environment is sent (checked at the proxy) but appears in no output."""
    import papermill as pm
    key = f"sk-test-{uuid.uuid4().hex}"
    proxy = FaultProxy(server.port, schedule=["ok"], expect_auth=key, log_path=tmp_path / "proxy.log")
    run_dir, cache = tmp_path / "run", tmp_path / "cache.sqlite"
    teacher = {"base_url": proxy.base_url, "local_server": None, "replay_paths": [], "cache_path": str(cache),
               "api_key_env": "OPENAI_API_KEY", "concurrency": 2}
    nq = {"target_pairs": 3, "max_calls": 4, "calls_per_round": 2, "max_tokens": 64}
    old = dict(os.environ)
    os.environ.update(_env(OPENAI_API_KEY=key))
    try:
        pm.execute_notebook(str(ROOT / "nbs" / "24_nq_synthetic.ipynb"), str(tmp_path / "executed.ipynb"),
                            parameters={"profile": "smoke", "run_dir": str(run_dir), "teacher": teacher, "nq": nq},
                            cwd=str(tmp_path), log_output=False, progress_bar=False, kernel_name="python3")
    finally:
        os.environ.clear(); os.environ.update(old)
        proxy.stop()
    recs, audit = _check_output(run_dir)
    assert read_manifest(run_dir)["status"] == "done"
    assert audit["calls"] >= 2 and audit["replies"] == audit["calls"]
    assert audit["teacher_models"] == [MODEL] and audit["system_fingerprints"]
    assert audit["usage"]["completion_tokens"] > 0
    assert audit["status"] in ("done", "max_calls_reached")
    assert sum(audit[k] for k in ("kept", "seed_copy", "duplicate_pair", "duplicate_question", "long_answer",
                                  "contaminated_exact", "contaminated_ngram")) <= audit["pairs_parsed"]
    for r in recs:
        assert r["meta"]["teacher_model"] == MODEL and r["meta"]["params"]["temperature"] == 1.0
    assert len(_cache_keys(cache)) == audit["calls"]
    # the key was really sent with every request ...
    assert proxy.events and all(e["auth_matches"] for e in proxy.events)
    # ... and is in no output: cache db (+WAL), jsonl, audit, manifest, executed notebook, proxy/server logs
    files = [p for p in tmp_path.rglob("*") if p.is_file()] + [server.log_path]
    assert any(p.suffix == ".sqlite" for p in files) and any(p.suffix == ".ipynb" for p in files)
    for p in files:
        assert key.encode() not in p.read_bytes(), f"API key leaked into {p}"


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fault_injection_then_kill9_resume(server, tmp_path):
    """≥ 30 % of requests fail (429 + Retry-After, 500, 503, connection reset, stall past the timeout): every
    call is answered exactly once. Then the collector is killed with SIGKILL mid-run and restarted: nothing
    lost, nothing duplicated, and no request for an already-cached call reaches the proxy again."""
    timeout = 60
    proxy = FaultProxy(server.port, schedule=DEFAULT_SCHEDULE, stall_s=timeout + 5, retry_after=1,
                       log_path=tmp_path / "proxy.log")
    cache = tmp_path / "cache.sqlite"
    teacher = {"base_url": proxy.base_url, "local_server": None, "replay_paths": [], "cache_path": str(cache),
               "timeout": timeout, "backoff_base": 0.2, "backoff_max": 2.0, "max_retries": 10, "concurrency": 2}
    nq = {"target_pairs": 1000, "max_calls": 6, "calls_per_round": 3, "max_tokens": 24}
    try:
        # phase A: faults on every other request
        res = subprocess.run(_collector_cmd(tmp_path / "a", teacher, nq), env=_env(), capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        ev = proxy.chat_events()
        faults = [e["fault"] for e in ev]
        assert sum(f != "ok" for f in faults) / len(faults) >= 0.3
        assert {"429", "500", "503", "reset", "stall"} <= set(faults)
        ok = proxy.ok_keys()
        keys_a = _cache_keys(cache)
        assert len(keys_a) == 6 and len(ok) == 6 and set(ok) == keys_a       # each call answered exactly once
        assert "Retry" in res.stderr or "retry" in res.stderr               # retries were logged ...
        recs_a, audit_a = _check_output(tmp_path / "a")
        assert audit_a["calls"] == 6 and audit_a["replies"] == 6

        # phase B: more calls on the same cache; kill -9 once some new answers are cached; restart
        nq_b = dict(nq, max_calls=10, calls_per_round=2)
        teacher_b = dict(teacher, concurrency=1)
        mark = len(proxy.events)
        proc = subprocess.Popen(_collector_cmd(tmp_path / "b", teacher_b, nq_b), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while len(_cache_keys(cache)) < 7 and time.time() - t0 < 600 and proc.poll() is None: time.sleep(0.5)
        assert proc.poll() is None, "collector finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        keys_killed = _cache_keys(cache)
        assert 7 <= len(keys_killed) < 10
        mark2 = len(proxy.events)
        res = subprocess.run(_collector_cmd(tmp_path / "b", teacher_b, nq_b), env=_env(), capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        # no request for a call cached before the restart was sent again (phase A's calls never were)
        sent_after = {k for e in proxy.chat_events(mark2) for k in e["keys"]}
        assert not (sent_after & keys_killed)
        assert not ({k for e in proxy.chat_events(mark) for k in e["keys"]} & keys_a)
        keys_b = _cache_keys(cache)
        assert len(keys_b) == 10                                              # nothing lost
        ok_all = proxy.ok_keys()
        in_flight = len(ok_all) - len(set(ok_all))                            # answered but killed before caching
        assert in_flight <= 1
        # ... and reported: the call in flight at the kill (if any; it may have hit a fault) is billed as re-sent
        stats_b = read_manifest(tmp_path / "b")["extra"]["teacher_stats"]
        assert in_flight <= stats_b["resent_after_interruption"] == stats_b["interrupted_in_flight"] <= 1
        recs_b, audit_b = _check_output(tmp_path / "b")                         # nothing duplicated
        assert audit_b["calls"] == 10 and read_manifest(tmp_path / "b")["status"] == "done"
        assert read_manifest(tmp_path / "b")["attempt"] == 2
        # the first 6 calls gave the same pairs as in phase A (deterministic processing of cached replies)
        assert [r["messages"] for r in recs_b[:len(recs_a)]] == [r["messages"] for r in recs_a]
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_budget_stop_is_consistent_and_resumable(server, tmp_path):
    "A request budget stops the stage cleanly; the state is consistent; a rerun with more budget completes."
    from imitation_nb.nq_synthetic import run_nq_synthetic
    from imitation_nb.teacher import BudgetExhausted
    cache = tmp_path / "cache.sqlite"
    teacher = {"base_url": server.base_url, "local_server": None, "replay_paths": [], "cache_path": str(cache),
               "concurrency": 1, "budget": {"max_requests": 2}}
    nq = {"target_pairs": 1000, "max_calls": 4, "calls_per_round": 4, "max_tokens": 16}
    run = tmp_path / "run"
    with pytest.raises(BudgetExhausted):
        run_nq_synthetic("smoke", run, teacher=teacher, nq=nq, progress=None)
    m = read_manifest(run)
    assert m["status"] == "failed" and "BudgetExhausted" in m["error"]
    assert m["extra"]["teacher_stats"]["requests_sent"] == 2
    assert len(_cache_keys(cache)) == 2
    recs, audit = _check_output(run)
    assert audit["status"] == "budget_exhausted" and audit["calls"] == 2
    # resume with a larger budget: only the 2 missing calls are sent
    run_nq_synthetic("smoke", run, teacher=dict(teacher, budget={"max_requests": 10}), nq=nq, progress=None)
    m = read_manifest(run)
    assert m["status"] == "done" and m["extra"]["teacher_stats"]["requests_sent"] == 2
    assert m["extra"]["teacher_stats"]["cache_hits"] == 2
    recs2, audit2 = _check_output(run)
    assert audit2["calls"] == 4 and len(_cache_keys(cache)) == 4
    assert [r["messages"] for r in recs2[:len(recs)]] == [r["messages"] for r in recs]


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_protocol_with_real_model(server):
    "The real server honours n, seed, stop and max_tokens, counts usage, and returns OpenAI error JSON."
    import openai
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    q = [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}]
    a = sdk.chat.completions.create(model=MODEL, messages=q, n=2, seed=3, temperature=1.0, max_tokens=8)
    b = sdk.chat.completions.create(model=MODEL, messages=q, n=2, seed=3, temperature=1.0, max_tokens=8)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and 0 < a.usage.completion_tokens <= 16 and a.usage.prompt_tokens > 10
    full = sdk.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=12).choices[0]
    words = full.message.content.split()
    assert len(words) >= 4 and full.finish_reason == "length"
    stop = " " + words[2]                                # greedy output, cut where its third word starts
    g = sdk.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=12, stop=[stop]).choices[0]
    assert g.finish_reason == "stop" and stop not in g.message.content
    assert full.message.content.startswith(g.message.content) and g.message.content.split() == words[:2]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=MODEL, messages=q, top_p=0)
    assert e.value.body["param"] == "top_p" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4", messages=q)


# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_lora_adapter(tmp_path):
    "A peft LoRA adapter is applied: served under MODEL+ADAPTER, with its own fingerprint and different outputs."
    import openai, torch
    from peft import LoraConfig, get_peft_model
    from imitation_nb.models import load_model
    from imitation_nb.serve import LocalChatModel, create_app, default_served_name
    from imitation_nb.teacher import ThreadServer
    torch.manual_seed(0)
    pm = get_peft_model(load_model(MODEL), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "my-adapter"); del pm
    base, ad = LocalChatModel(MODEL), LocalChatModel(MODEL, adapter=str(tmp_path / "my-adapter"))
    # the adapter is merged into the fp32 weights for serving: a LoRA target differs from the base's, the rest not
    assert ad.fingerprint != base.fingerprint
    assert not torch.equal(ad.model.model.layers[0].self_attn.q_proj.weight, base.model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(ad.model.model.layers[0].self_attn.k_proj.weight, base.model.model.layers[0].self_attn.k_proj.weight)
    q = [{"role": "user", "content": "Name a color."}]
    name = default_served_name(MODEL, str(tmp_path / "my-adapter"))
    assert name == f"{MODEL}+my-adapter"
    with ThreadServer(create_app(ad, name)) as srv:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in sdk.models.list().data] == [name]
        out = sdk.chat.completions.create(model=name, messages=q, temperature=0, max_tokens=8).choices[0].message.content
    assert out == ad.generate(q, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
    assert out != base.generate(q, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]


def test_helper_server_exits_when_its_client_is_killed(tmp_path):
    "A server started by `start_server` stops on its own once the process that started it is SIGKILLed (no orphans)."
    info = tmp_path / "server.json"
    code = ("import json, sys, time\nfrom imitation_nb.serve import start_server\n"
            f"s = start_server({MODEL!r}, timeout=900)\n"
            f"open({str(info)!r}, 'w').write(json.dumps({{'pid': s.proc.pid, 'url': s.base_url}}))\n"
            "time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", code], env=_env())
    try:
        t0 = time.time()
        while not info.exists() and time.time() - t0 < 900: time.sleep(0.5)
        srv = json.loads(info.read_text())
        os.kill(srv["pid"], 0)                                  # the server is up while its client lives
        client.send_signal(signal.SIGKILL); client.wait(30)
        t0 = time.time()
        while time.time() - t0 < 60:
            try: os.kill(srv["pid"], 0)
            except ProcessLookupError: break
            # a zombie (exited, not yet reaped by init in this container) counts as gone
            if Path(f"/proc/{srv['pid']}/stat").exists() and Path(f"/proc/{srv['pid']}/stat").read_text().split()[2] == "Z": break
            time.sleep(0.5)
        else:
            os.kill(srv["pid"], signal.SIGKILL)
            pytest.fail("the helper server outlived its killed client by 60 s")
    finally:
        if client.poll() is None: client.kill()


# --------------------------------------------------------------------------------------------------------
# In-flight requests: recorded before they are sent, billed as "re-sent after interruption" after a kill -9.
# These use the in-process fake OpenAI server (`fake_openai_app`: 10 prompt + 5 completion tokens per call),
# which counts the calls it answered, and the collector in teacher_fixtures/collect.py as the killed process.

def _inflight_rows(path) -> list:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try: return db.execute("SELECT key, owner, pid, call FROM inflight").fetchall()
    except sqlite3.OperationalError: return []                           # no such table
    finally: db.close()


def _wait_for(cond, what, procs=(), timeout=120):
    t0 = time.time()
    while not cond():
        for p in procs:
            if p.poll() is not None: pytest.fail(f"collector exited ({p.returncode}) before {what}")
        if time.time() - t0 > timeout: pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _collect_cmd(cfg: dict, n: int):
    return [sys.executable, str(COLLECT), json.dumps(cfg), str(n)]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_kill9_in_flight_requests_are_reported_and_billed(tmp_path):
    """kill -9 while `concurrency` calls are held by the server (received, not yet answered): the server answers
    them after the kill (a real API bills them), so they are paid twice once the restart sends them again. The
    restart reports exactly those (= upstream answered - cached), re-sends nothing that was cached, and the
    bill (cache totals + re-sent) matches the calls the upstream answered, in count and in dollars."""
    from imitation_nb.teacher import ThreadServer, fake_openai_app
    K, C, N = 5, 3, 12                 # answered before the kill / in flight at the kill (= concurrency) / requests
    pin, pout = 1.0, 2.0
    per_call = (10 * pin + 5 * pout) / 1e6
    app = fake_openai_app(hold_after=K)
    fake = app.state.fake
    cache = tmp_path / "cache.sqlite"
    with ThreadServer(app) as srv:
        cfg = {"base_url": srv.base_url, "model": "fake", "cache_path": str(cache), "concurrency": C,
               "timeout": 300, "max_retries": 0, "price_per_1m_input": pin, "price_per_1m_output": pout}
        with open(tmp_path / "run1.err", "w") as err:
            proc = subprocess.Popen(_collect_cmd(cfg, N), env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        try:
            _wait_for(lambda: fake["calls"] == K + C and len(_cache_keys(cache)) == K, "K answers cached, C held", [proc])
            rows = _inflight_rows(cache)                       # recorded (committed) before the calls were sent
            assert len(rows) == C and {r[2] for r in rows} == {proc.pid}
        finally:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        killed_keys = _cache_keys(cache)
        assert len(killed_keys) == K and len(_inflight_rows(cache)) == C
        fake["release"].set()                                  # the server answers the held calls: paid, lost
        _wait_for(lambda: fake["answered"] == K + C, "the held calls answered after the kill")
        answered1, keys1 = fake["answered"], list(fake["answered_keys"])
        lost = set(keys1) - killed_keys
        assert len(lost) == answered1 - len(killed_keys) == C

        res = subprocess.run(_collect_cmd(cfg, N), env=_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        out, st = _last_json(res.stdout), _last_json(res.stdout)["stats"]
        keys2 = fake["answered_keys"][len(keys1):]
        answered2 = fake["answered"] - answered1
        # the report: exactly the answered-but-uncached calls, found at start and re-sent
        assert st["interrupted_in_flight"] == answered1 - len(killed_keys)
        assert st["resent_after_interruption"] == answered1 - len(killed_keys)
        assert f"{C} request(s) ({C} sample(s))" in res.stderr and "in flight when an earlier run" in res.stderr
        assert res.stderr.count("re-sent after interruption") == 1 + C      # the summary + one per re-sent call
        assert lost <= set(keys2) and not (set(keys2) & killed_keys)        # nothing cached was sent again
        assert st["requests_sent"] == answered2 == N - K
        # the bill: this run's own calls + the lost ones; the cache's totals = every call the upstream answered
        assert st["dollars"] == pytest.approx(answered2 * per_call) and st["resent_dollars"] == pytest.approx(C * per_call)
        assert st["bill_dollars"] == pytest.approx((answered2 + C) * per_call)
        tot = out["totals"]
        assert tot["rows"] == N and tot["rows"] + tot["resent_after_interruption"] == answered1 + answered2
        assert tot["bill_dollars"] == pytest.approx((answered1 + answered2) * per_call)
        assert _inflight_rows(cache) == []
        assert out["answers"] == {f"q{i}": f"question number {i}"[::-1] + "#0" for i in range(N)}
        # a third run: all cached, nothing sent, nothing reported, the lost calls are not billed twice
        res3 = subprocess.run(_collect_cmd(cfg, N), env=_env(), capture_output=True, text=True, timeout=300)
        assert res3.returncode == 0, res3.stderr[-3000:]
        out3 = _last_json(res3.stdout)
        assert (out3["stats"]["requests_sent"], out3["stats"]["interrupted_in_flight"], out3["stats"]["resent_after_interruption"]) == (0, 0, 0)
        assert "re-sent" not in res3.stderr and out3["totals"] == tot and fake["answered"] == answered1 + answered2


def test_inflight_rows_of_live_concurrent_writers_are_not_billed(tmp_path):
    """Three collectors on one cache file, all holding the same keys in flight at once (the server holds every
    call until they all arrived): each records its own in-flight rows (WAL, no 'database is locked'), nobody
    takes another live process's rows for an interrupted run, and the table is empty at the end."""
    from imitation_nb.teacher import ThreadServer, fake_openai_app, ChatClient
    P, C, N = 3, 3, 9
    app = fake_openai_app(hold_after=0)
    fake = app.state.fake
    cache = tmp_path / "cache.sqlite"
    with ThreadServer(app) as srv:
        cfg = {"base_url": srv.base_url, "model": "fake", "cache_path": str(cache), "concurrency": C,
               "timeout": 300, "max_retries": 0}
        procs = [subprocess.Popen(_collect_cmd(cfg, N), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(P)]
        try:
            _wait_for(lambda: fake["calls"] == P * C, "every collector's calls in flight", procs)
            rows = _inflight_rows(cache)
            assert len(rows) == P * C and {r[2] for r in rows} == {p.pid for p in procs}
            assert len({r[0] for r in rows}) == C                          # the same C keys, once per process
            with ChatClient(cfg) as other:                                 # a 4th writer opening the file now
                assert other.stats()["interrupted_in_flight"] == 0
        finally:
            fake["release"].set()
            outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
        assert "database is locked" not in se and "in flight" not in se and "re-sent" not in se
        st = _last_json(so)["stats"]
        assert (st["interrupted_in_flight"], st["resent_after_interruption"]) == (0, 0)
    assert sum(_last_json(so)["stats"]["requests_sent"] for so, _ in outs) == fake["answered"]
    assert len(_cache_keys(cache)) == N and _inflight_rows(cache) == []


def test_old_cache_db_is_upgraded_in_place(tmp_path):
    """A cache written before the in-flight table existed (the committed recording) is upgraded in place when
    opened read-write: new tables, schema version 2, every old row byte-identical and still answered."""
    from imitation_nb.teacher import ThreadServer, fake_openai_app, ChatClient, ResponseCache
    old = tmp_path / "old.sqlite"
    shutil.copy(COMMITTED_CACHE, old)
    def dump(p):
        db = sqlite3.connect(p)
        try: return (db.execute("SELECT * FROM responses ORDER BY key").fetchall(),
                     {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")},
                     db.execute("PRAGMA user_version").fetchone()[0])
        finally: db.close()
    rows0, tables0, v0 = dump(old)
    assert tables0 == {"responses"} and v0 == 0 and len(rows0) > 0
    key, content = rows0[0][0], rows0[0][4]
    with ThreadServer(fake_openai_app()) as srv:
        with ChatClient(base_url=srv.base_url, model="fake", cache_path=str(old)) as cl:
            assert cl.stats()["interrupted_in_flight"] == 0
            assert cl.lookup(key)["content"] == content
            assert cl.complete_one([{"role": "user", "content": "new"}]) == "wen#0"
            cl.cache.checkpoint()
    rows1, tables1, v1 = dump(old)
    assert tables1 == {"responses", "inflight", "resent"} and v1 == 2
    assert len(rows1) == len(rows0) + 1 and set(rows0) <= set(rows1)          # nothing lost or changed
    assert ResponseCache(old, readonly=True).get(key)["content"] == content
