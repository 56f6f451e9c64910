"""Tests for eval_capability (issue 20, item 1): the eight capability sets and their lm-eval task definitions,
lm-eval's tokenization, the prefix-tree scorer against per-choice full-sequence scoring on both embedded
models, acc / acc_norm / partial scoring / LAMBADA targets, resumable stores and the stage.

Run: `HF_HUB_OFFLINE=1 pytest tests/test_eval_capability.py -q -p no:cacheprovider` (a few minutes on a busy
2-core CPU; the lm-eval comparisons are skipped when lm-eval-harness is not installed).
"""
import hashlib, importlib.util, json, math, os, re, shutil, tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from imitation_nb.core import project_root, read_jsonl, ProfileError
from imitation_nb import eval_capability as C

ROOT = project_root()
SUBJ = {"model": "smollm2-135m", "adapter": None, "role": "base", "model_family": "SmolLM2", "base_params_b": 0.135,
        "imitation_data": "none", "data_tokens_m": 0.0, "label": "SmolLM2-135M"}


@pytest.fixture(scope="module")
def smol():
    from imitation_nb.generate import load_lm
    torch.set_num_threads(1)
    return load_lm("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma():
    from imitation_nb.generate import load_lm
    return load_lm("gemma3-270m")


@pytest.fixture(scope="module")
def sets():
    return {t: C.load_task(t) for t in C.CAPABILITY_TASKS}


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_capability", ROOT / "benchmarks" / "bench_capability.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m


# ----------------------------------------------------------------------------- data

def test_data_checksums_match_provenance():
    "Every file listed in a PROVENANCE table has the sha256 and size given there, and nothing else ships."
    n = 0
    for t in C.CAPABILITY_TASKS:
        d = ROOT / "data" / "capability" / t
        rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", (d / "PROVENANCE.md").read_text(), re.M)
        assert rows, t
        for name, size, sha in rows:
            b = (d / name).read_bytes()
            assert len(b) == int(size) and hashlib.sha256(b).hexdigest() == sha, (t, name)
            n += 1
        assert sorted(p.name for p in d.iterdir()) == sorted([r[0] for r in rows] + ["PROVENANCE.md"]), t
    assert n == 12


def test_counts_labels_and_official_keys(sets):
    assert {t: len(v) for t, v in sets.items()} == {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042,
                                                   "lambada": 5153, "winogrande": 1267, "boolq": 3270, "openbookqa": 500}
    for t in ("arc_easy", "arc_challenge"):      # gold index -> letter/number agrees with AI2's official key on every id
        key = {r["id"]: r["answerKey"] for r in read_jsonl(ROOT / "data/capability" / t / "aristo-leaderboard_question-answers.jsonl")}
        raw = {r["id"]: r for r in read_jsonl(ROOT / "data/capability" / t / ("ARC-Easy-test.jsonl" if t == "arc_easy" else "ARC-Challenge-test.jsonl"))}
        for it in sets[t]:
            assert raw[it["id"]]["choices"]["label"][it["gold"]] == key[it["id"]]
            assert [r[1][1:] for r in it["requests"]] == raw[it["id"]]["choices"]["text"]
    numeric = [it for it in sets["arc_easy"] if it["id"] == "NYSEDREGENTS_2013_8_12"][0]   # labels "1".."4"
    assert numeric["gold"] == 0
    assert sum(len(it["choices"]) != 4 for it in sets["arc_easy"]) == 11             # 3- and 5-choice questions kept
    assert len({it["id"] for it in sets["openbookqa"]}) == 500
    for t, v in sets.items():
        assert all(0 <= it["gold"] < len(it["requests"]) or t == "lambada" for it in v)
        assert len({it["id"] for it in v}) == len(v)


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "data" / "capability", tmp_path / "capability")
    monkeypatch.setenv("IMITATION_NB_DATA", str(tmp_path))
    return tmp_path / "capability"


def _edit_line(path: Path, k: int, fn):
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[k] = fn(lines[k])
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("task,edit,message", [
    ("piqa", lambda d: (d / "piqa/valid-labels.lst").write_text("0\n" * 1837), "valid-labels.lst: 1837 labels for 1838 questions"),
    ("piqa", lambda d: _edit_line(d / "piqa/valid-labels.lst", 4, lambda l: "2"), "valid-labels.lst:5: label must be 0 or 1, got '2'"),
    ("winogrande", lambda d: _edit_line(d / "winogrande/winogrande.jsonl", 9, lambda l: l.replace('"gold": 0', '"gold": 2').replace('"gold": 1', '"gold": 2')),
     "winogrande.jsonl:10: gold must be 0 or 1, got 2"),
    ("boolq", lambda d: _edit_line(d / "boolq/boolq.jsonl", 2, lambda l: l.replace('"query": "Passage: ', '"query": "')),
     "boolq.jsonl:3: 'query' must read"),
    ("openbookqa", lambda d: _edit_line(d / "openbookqa/aristo-leaderboard_question-answers.jsonl", 0, lambda l: l.replace('"B"', '"C"')),
     "openbook_qa.jsonl:1: gold 1 disagrees with the official key row '8-343': 'C'"),
    ("lambada", lambda d: _edit_line(d / "lambada/lambada_test.jsonl", 6, lambda l: '{"text": "oneword"}'),
     "lambada_test.jsonl:7: 'text' needs at least two space-separated words"),
    ("arc_challenge", lambda d: _edit_line(d / "arc_challenge/ARC-Challenge-test.jsonl", 11, lambda l: l[:-5]),
     "ARC-Challenge-test.jsonl:12: not valid JSON"),
])
def test_bad_records_name_file_line_and_reason(data_copy, task, edit, message):
    edit(data_copy)
    with pytest.raises(ValueError, match=re.escape(message)):
        C.load_task(task)


def test_hellaswag_bad_label(data_copy):
    import bz2
    p = data_copy / "hellaswag/hellaswag_val_full.txt.bz2"
    L = bz2.open(p, "rt", encoding="utf-8").read().split("\n")
    L[6 * 5 + 1] = "4"
    with bz2.open(p, "wt", encoding="utf-8") as f: f.write("\n".join(L))
    with pytest.raises(ValueError, match=re.escape("hellaswag_val_full.txt.bz2:32: task 5: label must be 0-3, got '4'")):
        C.load_hellaswag()


def test_nested_subsets():
    items = list(range(1000))
    a, b, c = (C.nested_subset(items, n, 0, "piqa") for n in (100, 300, 0))
    assert set(a) < set(b) and c == items and a == sorted(a) and len(b) == 300
    assert C.nested_subset(items, 100, 0, "boolq") != a                     # per task
    assert C.nested_subset(items, 100, 1, "piqa") != a                      # per seed


# ----------------------------------------------------------------------------- lm-eval: the same requests, the same tokens

@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    "lm-eval 0.4.13's own task YAMLs (included) on our files, as the benchmark builds them."
    lm_eval = pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks import TaskManager
    bc = bench_module()
    d = tmp_path_factory.mktemp("lme")
    datasets.config.HF_DATASETS_CACHE = d / "hf_datasets"
    (d / "utils.py").write_text(bc.UTILS.format(data=str(C.capability_dir())))
    for t in C.CAPABILITY_TASKS:
        (d / f"imnb_{t}.yaml").write_text(bc.task_yaml(t, C.capability_dir(), Path(lm_eval.__file__).parent / "tasks"))
    return TaskManager(include_path=str(d)).load([f"imnb_{t}" for t in C.CAPABILITY_TASKS])["tasks"]


def test_requests_and_gold_equal_lm_evals(lm_eval_tasks, sets):
    "On 500 seeded items per task (all of OpenBookQA): lm-eval's request strings and gold index equal ours."
    for t in C.CAPABILITY_TASKS:
        task = lm_eval_tasks[f"imnb_{t}"]
        if task.get_config("num_fewshot") is None: task.set_config(key="num_fewshot", value=0)
        idx = [k for k, _ in sorted(C.nested_subset(list(enumerate(sets[t])), 500, 0, t))]
        task.build_all_requests(samples=idx, rank=0, world_size=1)
        by = {}
        for inst in task.instances: by.setdefault(inst.doc_id, []).append(inst)
        assert len(by) == len(idx), t
        for j, k in enumerate(idx):
            insts = sorted(by[j], key=lambda i: i.idx)          # with samples=, doc_id is the position in idx (file order)
            it = sets[t][k]
            assert [list(i.args) for i in insts] == it["requests"], (t, it["id"])
            doc = insts[0].doc
            gold = task.doc_to_text(doc) if t == "winogrande" else (0 if t == "lambada" else task.doc_to_target(doc))
            assert gold == it["gold"], (t, it["id"])
            if t not in ("lambada", "winogrande"): assert task.doc_to_choice(doc) == it["choices"], (t, it["id"])


def _fake_hflm(tok):
    "An object with the attributes lm-eval's HFLM.tok_encode and TemplateLM._encode_pair read (no model needed)."
    from lm_eval.models.huggingface import HFLM
    from lm_eval.api.model import TemplateLM
    class Fake: pass
    f = Fake(); f.tokenizer, f.add_bos_token, f.backend = tok, None, "causal"
    f.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    f.tok_encode = lambda s, **kw: HFLM.tok_encode(f, s, **kw)
    return lambda ctx, cont: TemplateLM._encode_pair(f, ctx, cont)


@pytest.mark.parametrize("spec", ["smollm2-135m-instruct", "gemma3-270m"])
def test_tokenization_equals_hflm_encode_pair(spec, sets):
    pytest.importorskip("lm_eval")
    from imitation_nb.models import load_tokenizer
    tok = load_tokenizer(spec)
    enc = _fake_hflm(tok)
    n = 0
    for t in C.CAPABILITY_TASKS:
        for it in C.nested_subset(sets[t], 60, 3, t):
            for ctx, cont in it["requests"]:
                assert tuple(C.encode_request(tok, ctx, cont)) == tuple(enc(ctx, cont)), (spec, t, it["id"]); n += 1
    for ctx, cont in [("Answer: ", "yes"), ("Answer:\n\n", " yes"), ("a", " b")]:     # whitespace moved like lm-eval
        assert tuple(C.encode_request(tok, ctx, cont)) == tuple(enc(ctx, cont))
    assert n > 1000
    if spec == "gemma3-270m": assert C.encode_request(tok, "Q", " A")[0][0] == tok.bos_token_id


# ----------------------------------------------------------------------------- the scorer

def _real_items(sets, per_task=3, seed=7):
    return [it for t in C.CAPABILITY_TASKS for it in C.nested_subset(sets[t], per_task, seed, t)]


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_prefix_tree_scoring_equals_naive_per_choice(which, request, sets):
    "Both embedded models, 2 real items of each of the 8 tasks: log-likelihoods within 1e-4, greedy flags equal."
    model, tok = request.getfixturevalue(which)
    items = _real_items(sets, 2)
    groups = [C.encode_item(tok, it) for it in items]
    packed = C.score_requests(model, groups, max_batch_items=5)
    worst = 0.0
    for it, g, p in zip(items, groups, packed):
        ref = C.naive_score_requests(model, g)
        assert len(p) == len(ref) == len(it["requests"])
        worst = max(worst, max(abs(a[0] - b[0]) for a, b in zip(p, ref)))
        assert [a[1] for a in p] == [b[1] for b in ref], it["id"]
    assert worst < 1e-4, worst
    # batch composition does not matter: one item per batch gives the same numbers
    alone = C.score_requests(model, groups[:6], max_batch_items=1)
    assert max(abs(a[0] - b[0]) for x, y in zip(alone, packed[:6]) for a, b in zip(x, y)) < 1e-4
    lone = C.score_requests(model, [[p] for g in groups[:3] for p in g])          # each request its own tree
    assert max(abs(a[0][0] - b[0]) for a, b in zip(lone, [r for x in packed[:3] for r in x])) < 1e-4


def test_sliding_window_mask_tiny_gemma(sets):
    "A tiny Gemma 3 (5 sliding-window layers + 1 global) with a window of 8 tokens: the prefix-tree masks equal transformers' own."
    from imitation_nb.models import tiny_random_model, load_tokenizer
    m = tiny_random_model("gemma3-270m", layers=6)
    m.config.sliding_window = 8
    assert m.config.layer_types[:6].count("sliding_attention") == 5
    tok = load_tokenizer("gemma3-270m")
    items = _real_items(sets, 2, 11)
    groups = [C.encode_item(tok, it) for it in items]
    for g, p in zip(groups, C.score_requests(m, groups, max_batch_items=4)):
        ref = C.naive_score_requests(m, g)
        assert max(abs(a[0] - b[0]) for a, b in zip(p, ref)) < 1e-4
    m.config.sliding_window = 4096                     # the window matters: without it the numbers differ
    far = C.score_requests(m, groups[:8])
    m.config.sliding_window = 8
    assert max(abs(a[0] - b[0]) for x, y in zip(far, C.score_requests(m, groups[:8])) for a, b in zip(x, y)) > 1e-3


def test_real_gemma_past_its_512_token_window(gemma, sets):
    "A BoolQ item made longer than Gemma 3's window (a passage repeated): tree scoring still equals the plain forward."
    model, tok = gemma
    it = dict(sets["boolq"][0])
    ctx = it["requests"][0][0]
    long_ctx = ctx.split("\nQuestion:")[0] * 3 + "\nQuestion:" + ctx.split("\nQuestion:")[1]
    it["requests"] = [[long_ctx, c] for _, c in it["requests"]]
    g = C.encode_item(tok, it)
    assert len(g[0][0]) > 600
    got, ref = C.score_requests(model, [g])[0], C.naive_score_requests(model, g)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-4


def test_hand_computed_loglik_uniform_model(sets):
    "Zero LM head -> uniform next-token distribution: each continuation scores exactly -k log V, greedy false."
    from imitation_nb.models import tiny_random_model, load_tokenizer
    m = tiny_random_model("smollm2-135m-instruct")
    with torch.no_grad(): m.lm_head.weight.zero_()
    tok = load_tokenizer("smollm2-135m-instruct")
    V = m.config.vocab_size
    items = [sets[t][0] for t in C.CAPABILITY_TASKS]
    groups = [C.encode_item(tok, it) for it in items]
    for g, res in zip(groups, C.score_requests(m, groups, max_batch_items=3)):
        for (_, cont), (ll, greedy) in zip(g, res):
            assert abs(ll + len(cont) * math.log(V)) < 1e-3 and not greedy


def test_winogrande_partial_scoring(smol, sets):
    """Only the continuation after the blank is scored: the option tokens are context. With a uniform model both
    options score the same whatever their lengths; with SmolLM2 the score is log P(rest | sentence start + option)."""
    from imitation_nb.models import tiny_random_model
    model, tok = smol
    it = next(x for x in sets["winogrande"] if len(x["choices"][0]) != len(x["choices"][1]))
    g = C.encode_item(tok, it)
    assert g[0][1] == g[1][1]                                    # the same continuation tokens after both contexts
    assert tok.decode(g[0][1]) == it["requests"][0][1]
    u = tiny_random_model("smollm2-135m-instruct")
    with torch.no_grad(): u.lm_head.weight.zero_()
    a, b = C.score_requests(u, [g])[0]
    assert abs(a[0] - b[0]) < 1e-4                               # option lengths do not enter the score
    res = C.score_requests(model, [g])[0]
    for (ctx, cont), (ll, _) in zip(g, res):
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        manual = sum(float(lp[len(ctx) - 1 + j, x]) for j, x in enumerate(cont))
        assert abs(ll - manual) < 1e-4
    rec = C.item_record(it, res)
    assert rec["acc_norm"] is None and rec["pred"] == int(res[1][0] > res[0][0])


def test_lambada_target_and_greedy_check(smol, sets):
    "LAMBADA: the target is ' ' + the last word, all of its tokens are scored, acc = every target token is the argmax."
    model, tok = smol
    multi = [it for it in C.nested_subset(sets["lambada"], 60, 0, "lambada")
             if len(C.encode_item(tok, it)[0][1]) >= 2][:6]
    assert len(multi) == 6
    raw = read_jsonl(ROOT / "data/capability/lambada/lambada_test.jsonl")
    for it in multi:
        ctx, tgt = it["requests"][0]
        text = raw[int(it["id"].split("-")[1])]["text"]
        assert ctx + tgt == text and tgt == " " + text.split(" ")[-1] and not ctx.endswith(" ")
    groups = [C.encode_item(tok, it) for it in multi]
    res = C.score_requests(model, groups)
    for (ctx, cont), [(ll, greedy)] in zip([g[0] for g in groups], res):
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]])).logits[0].float(), -1)
        am = lp[len(ctx) - 1:].argmax(-1).tolist()
        assert greedy == (am == cont)
        assert abs(ll - sum(float(lp[len(ctx) - 1 + j, x]) for j, x in enumerate(cont))) < 1e-4
    recs = [C.item_record(it, r) for it, r in zip(multi, res)]
    s = C.task_summary("lambada", recs)
    assert s["acc"] == sum(r[0][1] for r in res)
    assert abs(s["perplexity"] - math.exp(-sum(r[0][0] for r in res) / len(res))) < 1e-9


def test_acc_and_acc_norm_on_real_items(smol, sets):
    """lm-eval's two predictions on real ARC-Easy items: acc = argmax log-likelihood, acc_norm = argmax log-likelihood /
    characters of the choice; on items whose choices differ in length they pick different answers."""
    model, tok = smol
    items = C.nested_subset(sets["arc_easy"], 40, 0, "arc_easy")
    res = C.score_requests(model, [C.encode_item(tok, it) for it in items])
    recs = [C.item_record(it, r) for it, r in zip(items, res)]
    differ = [r for r in recs if r["pred"] != r["pred_norm"]]
    assert len(differ) >= 3
    for r in recs:
        assert r["pred"] == max(range(len(r["ll"])), key=lambda k: (r["ll"][k], -k))
        assert r["pred_norm"] == max(range(len(r["ll"])), key=lambda k: (r["ll"][k] / r["n_chars"][k], -k))
    for r in differ: assert len(set(r["n_chars"])) > 1


# ----------------------------------------------------------------------------- resumability and the stage

class _DiesAfter(torch.nn.Module):
    "Wraps a model; raises KeyboardInterrupt on forward call number `n` (a kill mid-task)."
    def __init__(self, model, n):
        super().__init__(); self.m, self.n, self.calls = model, n, 0
        self.config = model.config
    def forward(self, **kw):
        self.calls += 1
        if self.calls == self.n: raise KeyboardInterrupt
        return self.m(**kw)


def test_killed_task_resumes_from_its_store(smol, sets, tmp_path):
    model, tok = smol
    items = C.nested_subset(sets["arc_challenge"], 6, 0, "arc_challenge")
    store = tmp_path / "capability_arc_challenge.jsonl"
    with pytest.raises(KeyboardInterrupt):
        C.eval_capability_task(_DiesAfter(model, 2), tok, items, store, max_batch_items=2, progress=False)
    kept = read_jsonl(store)
    assert len(kept) == 2                                         # the first batch survived the kill
    counted = _DiesAfter(model, 10 ** 9)
    recs, k = C.eval_capability_task(counted, tok, items, store, max_batch_items=2, progress=False)
    assert k == 4 and counted.calls == 2                          # only the 4 remaining items, 2 batches
    fresh, _ = C.eval_capability_task(model, tok, items, tmp_path / "fresh.jsonl", max_batch_items=6, progress=False)
    for a, b in zip(recs, fresh):
        assert (a["id"], a["pred"], a["pred_norm"]) == (b["id"], b["pred"], b["pred_norm"])
        assert max(abs(x - y) for x, y in zip(a["ll"], b["ll"])) < 1e-4
    # changed requests for the same id (e.g. a prompt fix) are re-scored, not reused
    items2 = [dict(items[0], requests=[[c + " ", x] for c, x in items[0]["requests"]])] + items[1:]
    assert C.eval_capability_task(model, tok, items2, store, progress=False)[1] == 1


def test_stage_rows_records_and_cached_rerun(tmp_path, monkeypatch):
    from imitation_nb import generate
    import pandas as pd
    tasks = ["arc_easy", "lambada", "winogrande", "boolq"]
    d = C.run_eval_capability("smoke", tmp_path / "run", SUBJ, tasks, {"n": 3, "n_per_task": {"boolq": 2}}, threads=1, progress=False)
    df = pd.read_csv(d / "results.csv")
    assert list(df.metric_key) == ["cap_arc_easy_acc", "cap_arc_easy_acc_norm", "cap_lambada_acc", "cap_lambada_perplexity",
                                   "cap_winogrande_acc", "cap_boolq_acc", "cap_pooled_acc"]
    assert (df.model == "SmolLM2-135M").all() and (df.role == "base").all()
    assert list(df.n) == [3, 3, 3, 3, 3, 2, 11]
    pooled = df.set_index("metric_key").loc["cap_pooled_acc"]
    recs = {t: read_jsonl(d / f"predictions_{t}.jsonl") for t in tasks}
    k = sum(r["acc_norm"] if t == "arc_easy" else r["acc"] for t in tasks for r in recs[t])
    assert abs(pooled.value - 100 * k / 11) < 1e-9 and pooled.ci_low <= pooled.value <= pooled.ci_high
    r0 = recs["arc_easy"][0]
    assert set(r0) >= {"task", "id", "gold", "ll", "greedy", "pred", "acc", "pred_norm", "acc_norm"} and len(r0["ll"]) == 4
    assert [r["id"] for r in recs["arc_easy"]] == [it["id"] for it in C.nested_subset(C.load_task("arc_easy"), 3, 0, "arc_easy")]
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "done" and set(man["extra"]["task_wall_s"]) == set(tasks)
    # everything stored: a rerun loads no model and scores nothing
    monkeypatch.setattr(generate, "make_generator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    d2 = C.run_eval_capability("smoke", tmp_path / "run", SUBJ, tasks, {"n": 3, "n_per_task": {"boolq": 2}}, threads=1, progress=False)
    s = json.loads((d2 / "summary.json").read_text())
    assert d2 == d and set(s["scored_now"].values()) == {0}
    assert pd.read_csv(d2 / "results.csv").drop(columns="created").equals(df.drop(columns="created"))


def test_stage_errors():
    with pytest.raises(ValueError, match="unknown capability tasks \\['sciq'\\]"):
        C.run_eval_capability("smoke", None, SUBJ, ["arc_easy", "sciq"])
    with pytest.raises(ValueError, match="needs a local model"):
        C.run_eval_capability("smoke", None, dict(SUBJ, model="teacher"))
    with pytest.raises(ProfileError, match="eval_capability.batch"):
        C.run_eval_capability("smoke", None, SUBJ, sizes={"batch": 3})
    with pytest.raises(KeyError, match="not in profile"):
        C.run_eval_capability("smoke", None, dict(SUBJ, model="llama-7b"))
