"""Tests for issue 6: QA exact match, MMLU letter scoring, HumanEval through the sandbox, hostile code
containment, and the generation engine on the embedded SmolLM2-135M-Instruct.

Run: `HF_HUB_OFFLINE=1 pytest tests/test_eval_benchmarks.py` (about 3-6 minutes on a busy 2-core CPU).
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from imitation_nb.eval_benchmarks import (normalize_answer, exact_match, first_line, mmlu_prompt, mmlu_letter_scores,
                                          mmlu_summary, load_humaneval, humaneval_program, pass_at_k, qa_prompt,
                                          load_mmlu, CHOICES, extract_code, humaneval_completion, humaneval_prompt_mode)
from imitation_nb.core import load_profile
from imitation_nb.sandbox import (run_sandboxed, run_many, SandboxLimits, sandbox_capabilities, TestedProgram)

CAPS = sandbox_capabilities()

# ----------------------------------------------------------------------------- QA exact match

@pytest.mark.parametrize("pred,golds,ok", [
    ("The Beatles", ["Beatles"], True),
    ("beatles.", ["The Beatles"], True),
    ("  George  Washington ", ["george washington"], True),
    ("an Apple", ["apple"], True),
    ("Washington", ["George Washington"], False),           # partial answers are wrong
    ("December 1972", ["14 December 1972 UTC", "December 1972"], True),   # any alias
    ("1972", ["14 December 1972 UTC", "December 1972"], False),
    ("Theatre", ["atre"], False),                            # 'the' removed only as a word
    ("U.S.", ["US"], True),                                  # punctuation dropped
    ("", ["one"], False),
])
def test_exact_match_hand_worked(pred, golds, ok):
    assert exact_match(pred, golds) is ok

def test_normalize_answer_steps():
    assert normalize_answer("The Lord of the Rings: The Return!") == "lord of rings return"
    assert normalize_answer("a  b\tc") == "b c"
    assert first_line("\n  Paris \nQ: next?") == "Paris"

def test_qa_prompt_format():
    p = qa_prompt("who wrote hamlet", [{"question": "capital of france?", "answers": ["Paris", "paris"]}])
    assert p == "Answer these questions:\nQ: capital of france?\nA: Paris\nQ: who wrote hamlet?\nA:"

# ----------------------------------------------------------------------------- MMLU

def test_mmlu_letter_scoring_hand_worked():
    lp = [[-1.2, -0.3, -2.0, -4.0],     # B
          [-0.1, -3.0, -3.0, -3.0],     # A
          [-5.0, -4.0, -3.0, -0.01],    # D
          [-2.0, -2.0, -1.0, -1.0]]     # tie C/D -> first (C)
    assert mmlu_letter_scores(lp) == [1, 0, 3, 2]
    recs = [{"subject": s, "pred": p, "answer": a} for s, p, a in
            [("x", 1, 1), ("x", 0, 2), ("x", 3, 3), ("y", 2, 0)]]
    s = mmlu_summary(recs)
    assert (s["correct"], s["n"]) == (2, 4)
    assert s["micro"] == 0.5 and abs(s["macro"] - (2 / 3 + 0) / 2) < 1e-12

def test_mmlu_prompt_is_hendrycks_format():
    dev = load_mmlu("anatomy", "dev")
    q = load_mmlu("anatomy", "test")[0]
    p = mmlu_prompt(q, dev, 5)
    assert p.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert p.count("\nAnswer:") == 6 and p.endswith("\nD. " + q["choices"][3] + "\nAnswer:")
    first = dev[0]
    assert f"{first['question']}\nA. {first['choices'][0]}" in p
    assert f"Answer: {CHOICES[first['answer']]}\n\n" in p

def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert abs(pass_at_k(20, 5, 1) - 0.25) < 1e-12
    assert abs(pass_at_k(4, 1, 2) - 0.5) < 1e-12          # 1 - C(3,2)/C(4,2) = 1 - 3/6

# ----------------------------------------------------------------------------- HumanEval through the sandbox

@pytest.fixture(scope="module")
def problems():
    ps = load_humaneval()
    assert len(ps) == 164
    return ps

def test_canonical_solutions_pass_all_164(problems):
    res = run_many([humaneval_program(p, p["canonical_solution"]) for p in problems],
                   SandboxLimits(timeout_s=20, cpu_s=20), workers=2)
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(problems, res) if not r.passed]
    assert not failed, failed
    assert sum(r.passed for r in res) == 164

def test_empty_completion_fails_all_164(problems):
    res = run_many([humaneval_program(p, "") for p in problems], SandboxLimits(timeout_s=20, cpu_s=20), workers=2)
    assert sum(r.passed for r in res) == 0
    assert {r.status for r in res} <= {"failed", "timeout"}

def _chat_reply(p, body):
    "A chat-style reply: prose, the restated function in a fence with example calls, more prose."
    return (f"Sure! Here is the implementation of `{p['entry_point']}`:\n\n```python\n{p['prompt']}{body}\n\n"
            f"# example\nprint({p['entry_point']})\nassert False, 'top-level code after the function must not run'\n```\n\n"
            "This works because it follows the docstring.")

def test_chat_replies_with_restated_canonical_solutions_pass_all_164(problems):
    "The chat protocol: the code of a fenced reply that restates the function is what runs; top-level calls are dropped."
    comps = [humaneval_completion(p, _chat_reply(p, p["canonical_solution"]), "chat") for p in problems]
    assert all("assert False" not in c and f"def {p['entry_point']}(" in c for p, c in zip(problems, comps))
    res = run_many([humaneval_program(p, c) for p, c in zip(problems, comps)], SandboxLimits(timeout_s=20, cpu_s=20), workers=2)
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(problems, res) if not r.passed]
    assert not failed, failed
    # a restated stub (docstring, `pass`) fails every problem: the extracted code, not the prompt, is what is tested
    comps = [humaneval_completion(p, _chat_reply(p, "    pass\n"), "chat") for p in problems[:20]]
    res = run_many([humaneval_program(p, c) for p, c in zip(problems[:20], comps)], SandboxLimits(timeout_s=20, cpu_s=20), workers=2)
    assert sum(r.passed for r in res) == 0

@pytest.mark.parametrize("reply, expect", [
    ("```python\n    return x + 1\n```\nDone.", "\n    return x + 1\n"),                 # body only, indented
    ("```\nreturn x + 1\n```", "\n    return x + 1\n"),                                  # body only, unindented
    ("    return x + 1\n\ndef other():\n    pass", "\n    return x + 1\n"),                  # no fence: original stops
    ("def inc(x):\n    return x + 1\nprint(inc(1))", "\ndef inc(x):\n    return x + 1\n"),  # no fence, restated
    ("```python\nimport math\n\ndef inc(x):\n    return math.floor(x) + 1\n\nif __name__ == '__main__':\n    print(inc(2))\n```",
     "\nimport math\n\ndef inc(x):\n    return math.floor(x) + 1\n"),                       # imports kept, main block dropped
    ("```python\ndef inc(x)\n    return x + 1\n```", "\ndef inc(x)\n    return x + 1\n"),  # syntax error: kept, fails later
])
def test_extract_code_hand_worked(reply, expect):
    assert extract_code(reply, "inc") == expect

def test_humaneval_prompt_mode_by_profile():
    prof = load_profile("mini")
    assert humaneval_prompt_mode(prof, {"model": "smollm2-135m"}) == "chat"          # instruct: true
    assert humaneval_prompt_mode(prof, {"model": "gemma3-270m"}) == "completion"     # a base LM: the original protocol
    assert humaneval_prompt_mode(prof, {"model": "teacher"}) == "chat"
    assert humaneval_prompt_mode(prof, {"model": "smollm2-135m"}, "completion") == "completion"

# ----------------------------------------------------------------------------- hostile completions

def _sandbox_procs():
    "Processes currently running under a sandbox uid (100000-999999)."
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if l.split() and 100_000 <= int(l.split()[0]) < 1_000_000]

MARK = Path(__file__).resolve().parent / "evalbench_fixtures" / "OUTSIDE_WRITE_MARKER"

def hostile_programs(parent_pid):
    return {
        "fork_bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n",
        "memory_bomb": "x = []\nwhile True: x.append(bytearray(50 * 1024 * 1024))\n",
        "big_alloc": "x = bytearray(16 * 1024 ** 3)\n",
        "infinite_loop": "while True: pass\n",
        "sleep_forever": "import time; time.sleep(10 ** 6)\n",
        "write_outside": f"open({str(MARK)!r}, 'w').write('pwned')\n",
        "write_home": "import os; open(os.path.expanduser('/root/pwned'), 'w').write('x')\n",
        "huge_file": "f = open('big.bin', 'wb')\nwhile True: f.write(b'0' * (1 << 20))\n",
        "socket": "import socket; socket.create_connection(('127.0.0.1', 22), timeout=3)\n",
        "dns_http": "import urllib.request; urllib.request.urlopen('http://pypi.org', timeout=3)\n",
        "read_api_key": "import os; assert os.environ['OPENAI_API_KEY'].startswith('sk-')\n",
        "read_parent_environ": f"assert b'OPENAI_API_KEY' in open('/proc/{parent_pid}/environ', 'rb').read()\n",
        "kill_parent": f"import os, signal; os.kill({parent_pid}, signal.SIGKILL)\n",
        "kill_ppid": "import os, signal; os.kill(os.getppid(), signal.SIGKILL)\n",
        "kill_all": "import os, signal; os.kill(-1, signal.SIGKILL)\n",
        "early_exit_zero": "import os; os._exit(0)\n",
        "sys_exit_zero": "import sys; sys.exit(0)\n",
    }

def _as_completion(prog):
    "A hostile program as a HumanEval-style job: its code runs first, then a correct function the tests call."
    return TestedProgram(prog + "\ndef f(x):\n    return x + 1\n", "assert f(1) == 2\nassert f(-1) == 0", "f")

@pytest.mark.parametrize("use_ns", [True, False], ids=["namespaces", "no-namespaces"])
def test_hostile_completions_are_contained(use_ns, monkeypatch):
    if use_ns and CAPS["mode"] not in ("root-ns", "userns"): pytest.skip("namespaces not permitted here")
    if not use_ns and not CAPS["uid_fallback"]:
        # without namespaces the separate uid needs root and a world-readable interpreter; code running as this
        # user with only rlimits could kill this process, so the hostile set is not run in that configuration
        pytest.skip("no-namespace fallback cannot drop to a separate uid here (not root, or interpreter under a private dir)")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-123456")
    MARK.unlink(missing_ok=True)
    me = os.getpid()
    progs = hostile_programs(me)
    if not use_ns:   # without namespaces the network and world-writable paths are not blocked (documented)
        for k in ("socket", "dns_http"): progs.pop(k)
        if not CAPS["root"]: progs.pop("fork_bomb")   # RLIMIT_NPROC needs the separate uid to bind
    lim = SandboxLimits(timeout_s=6, cpu_s=6, memory_mb=512, nproc=12, fsize_mb=8)
    t0 = time.time()
    assert run_sandboxed(_as_completion(""), lim, use_namespaces=use_ns, allow_unsandboxed=not use_ns).passed
    for name, prog in progs.items():
        r = run_sandboxed(_as_completion(prog), lim, use_namespaces=use_ns, allow_unsandboxed=not use_ns)
        assert not r.passed, (name, r)
        assert r.status in ("failed", "timeout"), (name, r.status)
        assert r.wall_s < lim.timeout_s + 6, (name, r.wall_s)
    # the test process and the machine are unharmed
    assert os.getpid() == me and not MARK.exists() and not Path("/root/pwned").exists()
    time.sleep(0.5)
    assert not _sandbox_procs(), _sandbox_procs()          # nothing escaped (fork bomb children included)
    assert run_sandboxed("print('still works')", lim, use_namespaces=use_ns, allow_unsandboxed=not use_ns).passed
    assert time.time() - t0 < 300

def test_fork_bomb_is_bounded_by_nproc():
    "With RLIMIT_NPROC in place the bomb cannot exceed its process budget; the timeout ends it."
    if not CAPS["root"]: pytest.skip("RLIMIT_NPROC only binds a separate uid (needs root to switch)")
    prog = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0: time.sleep(30); os._exit(0)\n"
            "        n += 1\n    except OSError: break\nprint('forked', n)\nassert n < 200\nraise SystemExit(1)\n")
    r = run_sandboxed(prog, SandboxLimits(timeout_s=8, nproc=10))
    assert not r.passed
    forked = int(r.stdout.split("forked")[1].split()[0])
    assert forked < 10, r.stdout                             # the uid's process budget, not 200
    time.sleep(0.5)
    assert not _sandbox_procs()

def test_secrets_and_scratch_dir():
    os.environ["SOME_SERVICE_TOKEN"] = "tok-abcdefgh12345"
    try:
        r = run_sandboxed("import os, json; print(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd(), "
                          "'files': os.listdir('.')}))")
    finally:
        del os.environ["SOME_SERVICE_TOKEN"]
    import json
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.passed and "SOME_SERVICE_TOKEN" not in info["env"] and info["files"] == []
    assert set(info["env"]) <= {"PATH", "LANG", "HOME", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}

# ----------------------------------------------------------------------------- generation engine (real model)

@pytest.fixture(scope="module")
def gen():
    import torch
    torch.set_num_threads(1)
    from imitation_nb.generate import Generator
    return Generator("smollm2-135m-instruct")

def test_batched_generation_equals_single(gen):
    items = [{"id": str(i), "prompt": p} for i, p in enumerate(
        ["Q: What is the capital of France?\nA:", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
         "The tallest mountain in the world is"])]
    b = gen.generate(items, max_new_tokens=16, stop=["\n\n"], progress=False)
    s = [gen.generate([it], max_new_tokens=16, stop=["\n\n"], progress=False)[0] for it in items]
    assert [x["output"] for x in b] == [x["output"] for x in s]
    assert all("\n\n" not in x["output"] for x in b)
    assert "Paris" in b[0]["output"]

def test_mmlu_scoring_padding_invariant(gen):
    from imitation_nb.generate import next_token_logprobs, single_token_ids
    ids = single_token_ids(gen.tok, [" A", " B", " C", " D"])
    dev = load_mmlu("astronomy", "dev")
    qs = load_mmlu("astronomy", "test")[:3]
    prompts = [mmlu_prompt(q, dev, k) for q, k in zip(qs, (5, 1, 0))]     # very different lengths
    together = next_token_logprobs(gen.model, gen.tok, prompts, ids, max_batch=3)
    alone = [next_token_logprobs(gen.model, gen.tok, [p], ids)[0] for p in prompts]
    for t, a in zip(together, alone): assert abs(t - a).max() < 1e-3
    # sharing the 5-shot prefix's KV cache within a subject gives the same log-probs
    p5 = [mmlu_prompt(q, dev, 5) for q in qs]
    grouped = next_token_logprobs(gen.model, gen.tok, p5, ids, groups=["astronomy"] * 3)
    assert abs(grouped - next_token_logprobs(gen.model, gen.tok, p5, ids)).max() < 1e-3

def test_shared_prefix_scoring_past_gemma_sliding_window():
    "Gemma 3's sliding-window layers (512 tokens): the shared-prefix KV path must equal the plain forward past the window."
    from imitation_nb.generate import load_lm, next_token_logprobs, single_token_ids
    model, tok = load_lm("gemma3-270m")
    assert model.config.sliding_window == 512
    ids = single_token_ids(tok, [" A", " B", " C", " D"])
    dev = load_mmlu("astronomy", "dev")
    qs = load_mmlu("astronomy", "test")[:3]
    pre = "Background. " + " ".join(d["question"] for d in dev) * 3 + "\n\n"
    prompts = [pre + mmlu_prompt(q, dev, 5) for q in qs]
    assert min(len(tok(p).input_ids) for p in prompts) > 600          # past the window
    plain = next_token_logprobs(model, tok, prompts, ids)
    grouped = next_token_logprobs(model, tok, prompts, ids, groups=["astronomy"] * 3)
    assert abs(grouped - plain).max() < 1e-3
    assert (grouped.argmax(1) == plain.argmax(1)).all()

def test_generate_to_file_resumes(gen, tmp_path):
    from imitation_nb.generate import generate_to_file
    from imitation_nb.core import read_jsonl
    items = [{"id": f"q{i}", "prompt": f"Q: what is {i} plus {i}?\nA:"} for i in range(3)]
    f = tmp_path / "generations.jsonl"
    generate_to_file(gen, items[:2], f, max_new_tokens=6, stop=["\n"], progress=False)
    with open(f, "a") as fh: fh.write('{"id": "torn')                # a crash mid-write
    recs = generate_to_file(gen, items, f, max_new_tokens=6, stop=["\n"], progress=False)
    assert [r["id"] for r in read_jsonl(f)] == ["q0", "q1", "q2"]
    assert recs[2]["prompt"] == items[2]["prompt"] and recs[2]["n_new_tokens"] >= 1


def test_generate_stage_sends_held_out_prompts_as_chat_turns(tmp_path):
    "Held-out prompts are user turns: the stage renders them through the chat template (a raw string made the instruct model end at once)."
    from imitation_nb.generate import run_generate
    from imitation_nb.core import read_jsonl, append_jsonl
    prompts = tmp_path / "heldout_prompts.jsonl"
    append_jsonl(prompts, [{"id": "p0", "prompt": "Help me design an aesthetic and comfortable living room.", "reference": "Sure."}])
    subj = {"model": "smollm2-135m", "adapter": None, "role": "base", "model_family": "SmolLM2", "base_params_b": 0.135,
            "imitation_data": "none", "data_tokens_m": 0.0, "label": "SmolLM2-135M"}
    out = run_generate("smoke", tmp_path / "run", subj, prompts)
    rec = read_jsonl(out / "generations.jsonl")[0]
    assert rec["prompt"].startswith("<|im_start|>") and rec["prompt"].rstrip().endswith("<|im_start|>assistant")
    assert "living room" in rec["prompt"] and rec["output"].strip() and rec["n_new_tokens"] > 5


def test_task_wall_time_sums_over_attempts(tmp_path):
    "A resumed evaluation keeps the seconds its earlier attempt spent on a task (a cached rerun adds only its own)."
    from imitation_nb.eval_benchmarks import run_eval_benchmarks
    subj = {"model": "smollm2-135m", "adapter": None, "role": "base", "model_family": "SmolLM2", "base_params_b": 0.135,
            "imitation_data": "none", "data_tokens_m": 0.0, "label": "SmolLM2-135M"}
    sizes = {"nq_n": 2, "qa_max_new_tokens": 4}
    wall = lambda d: json.loads((d / "summary.json").read_text())["wall_s"]["nq"]
    d = run_eval_benchmarks("smoke", tmp_path / "run", subj, ["nq"], sizes, threads=1)
    first = wall(d)
    d2 = run_eval_benchmarks("smoke", tmp_path / "run", subj, ["nq"], sizes, threads=1)   # everything cached now
    assert d2 == d and first > 0
    assert first <= wall(d2) < first + 5, (first, wall(d2))
    assert json.loads((d / "manifest.json").read_text())["extra"]["task_wall_s"]["nq"] == wall(d2)
