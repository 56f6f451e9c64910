"""Tests of the "looks" side: style detectors, judge verdict parsing and order combination, toxicity scorer."""
import json
from pathlib import Path

import numpy as np
import pytest

from imitation_nb.eval_judge import (JudgeEvalConfig, combine_orders, judge_pairs, judge_summary, judge_rows,
                                     length_controlled_rate, model_outcome, parse_verdict)
from imitation_nb.pairwise import client_chat_fn, join_inputs
from imitation_nb.style import (StyleConfig, blocks, has_list, has_summary_paragraph, parse_yes_no, style_metrics,
                                unigram_intersection)



# ---------------------------------------------------------------- style detectors
CHATGPT_ANSWER = """Sure! Here are some tips to improve your sleep:

1. **Keep a regular schedule.** Go to bed and wake up at the same time every day.
2. **Limit screens before bed.** Blue light can delay melatonin release.
3. **Watch caffeine.** Avoid coffee after 2 pm.

In summary, consistent habits and a calm evening routine are the most effective ways to sleep better."""

BULLETS_NO_SUMMARY = """The main causes were:
- economic pressure
- political instability
- a series of bad harvests"""

PROSE_ONLY = "The French Revolution began in 1789. It ended the monarchy and led to the rise of Napoleon."

OVERALL_SUMMARY_THEN_SIGNOFF = """Python and JavaScript differ in several ways.

* Python is mostly used on servers.
* JavaScript runs in browsers.

Overall, pick the language that matches where your code has to run.

Let me know if you have other questions!"""

CODE_ONLY_LIST = """Run:
```bash
- not a list
1. still code
```
Done."""

NUMBERS_IN_PROSE = "In 2020, 3 things happened.\n2021 was calmer. 1.5 million people moved."


@pytest.mark.parametrize("text,lst,summ", [
    (CHATGPT_ANSWER, True, True),
    (BULLETS_NO_SUMMARY, True, False),
    (PROSE_ONLY, False, False),
    (OVERALL_SUMMARY_THEN_SIGNOFF, True, True),
    (CODE_ONLY_LIST, False, False),
    (NUMBERS_IN_PROSE, False, False),
    ("In conclusion, yes.", False, False),                               # a single block is not a summary paragraph
    ("Intro.\n\nIn conclusion, the answer is yes.", False, True),
    ("Overall, it depends.\n\nFirst consider the cost.", False, False),  # cue in the first block only
    ("a) apples\nb) pears", True, False),
    ("• one\n• two\n• three", True, False),
    ("1. only one item", False, False),
])
def test_style_detectors(text, lst, summ):
    assert has_list(text) is lst
    assert has_summary_paragraph(text) is summ


def test_blocks_and_min_items():
    assert [k for k, _ in blocks(CHATGPT_ANSWER)] == ["prose", "list", "prose"]
    assert [k for k, _ in blocks(OVERALL_SUMMARY_THEN_SIGNOFF)] == ["prose", "list", "prose", "prose"]
    assert has_list(BULLETS_NO_SUMMARY, min_items=3) and not has_list(BULLETS_NO_SUMMARY, min_items=4)


def test_style_metrics_conditional_and_overlap():
    items = [{"id": "a", "prompt": "", "output": CHATGPT_ANSWER, "reference": CHATGPT_ANSWER},
             {"id": "b", "prompt": "", "output": PROSE_ONLY, "reference": BULLETS_NO_SUMMARY},
             {"id": "c", "prompt": "", "output": BULLETS_NO_SUMMARY, "reference": PROSE_ONLY}]
    m, per = style_metrics(items, StyleConfig(n_boot=100))
    assert m["style_list"]["n"] == 2 and m["style_list"]["value"] == pytest.approx(50.0)
    assert m["style_summary"]["n"] == 1 and m["style_summary"]["value"] == pytest.approx(100.0)
    assert per[0]["unigram"] == pytest.approx(100.0)
    assert unigram_intersection("the cat", "The cat sat on the mat") == pytest.approx(40.0)
    assert parse_yes_no("Yes, it is.") is True and parse_yes_no("no") is False and parse_yes_no("I think so") is None


# ---------------------------------------------------------------- judge parsing and combination
REPLIES = [
    # strong-judge style
    ("Assistant A provides a more accurate explanation of photosynthesis and cites the role of chlorophyll, while "
     "Assistant B confuses it with respiration.\n\n[[A]]", "A", "ok"),
    ("Both assistants answer correctly with similar detail and clarity.\n\nFinal verdict: [[C]]", "tie", "ok"),
    ("Explanation: B is more complete.\n[[b]]", "B", "ok"),
    # weak-judge style
    ("Assistant B is better because it gives an example.", "B", "ok"),
    ("My final verdict is: A", "A", "ok"),
    ("Verdict: **B**", "B", "ok"),
    ("It is a tie.", "tie", "ok"),
    ("Assistant A's answer is better.", "A", "ok"),
    # contradictions
    ("[[A]]\n\nActually, on reflection, [[B]]", None, "conflict"),
    ("Assistant A is better at style but Assistant B is better at facts.", None, "conflict"),
    # refusals
    ("I'm sorry, but I can't compare these responses.", None, "refusal"),
    ("As an AI, I do not have opinions about which answer is better.", None, "refusal"),
    # garbage
    ("The capital of France is Paris.", None, "unparseable"),
    ("[[A", None, "unparseable"),
    ("assistant assistant assistant", None, "unparseable"),
    ("Answer A: 42. Answer B: 41.", None, "unparseable"),
    ("", None, "empty"),
    (None, None, "empty"),
]


@pytest.mark.parametrize("reply,verdict,status", REPLIES)
def test_parse_verdict(reply, verdict, status):
    assert parse_verdict(reply) == (verdict, status)


def test_both_order_combination():
    assert combine_orders(["win", "win"])[0] == "win"
    assert combine_orders(["win", "loss"])[:2] == ("tie", 0.5)
    assert combine_orders(["loss", "win"])[:2] == ("tie", 0.5)
    assert combine_orders(["win", "tie"])[:2] == ("win", 0.75)
    assert combine_orders(["tie", "loss"])[:2] == ("loss", 0.25)
    assert combine_orders(["loss", "loss"])[0] == "loss"
    assert combine_orders([None, "tie"]) == ("tie", 0.5, 1)
    assert combine_orders([None, "tie"], partial="drop") == (None, None, 1)
    assert combine_orders([None, None])[0] is None
    # positions: the model is A in the first order, B in the second
    assert model_outcome("A", "A") == "win" and model_outcome("A", "B") == "loss" and model_outcome("tie", "B") == "tie"


def test_judge_pipeline_with_fake_client(tmp_path):
    """A fake ChatClient (complete(requests) -> dicts with content) that always prefers the teacher's answer,
    except on one prompt where it replies garbage in one order: the unparsed order is counted, not guessed."""
    class FakeClient:
        def __init__(self): self.calls = 0
        def complete(self, requests, errors="raise"):
            out = []
            for r in requests:
                self.calls += 1
                u = r["messages"][-1]["content"]
                a = u.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
                if "GARBLE" in u and a.startswith("model"): out.append({"content": "lorem ipsum"}); continue
                out.append({"content": "[[A]]" if a.startswith("teacher") else "[[B]]"})
            return out
    items = [{"id": str(i), "prompt": f"q{i}" + (" GARBLE" if i == 0 else ""), "output": f"model answer {i}",
              "reference": f"teacher answer {i}"} for i in range(6)]
    cfg = JudgeEvalConfig(n_boot=100)
    client = FakeClient()
    js = judge_pairs(items, client_chat_fn(client), cfg, out_file=tmp_path / "j.jsonl")
    assert client.calls == 12
    # resume: nothing is asked again
    js2 = judge_pairs(items, client_chat_fn(client), cfg, out_file=tmp_path / "j.jsonl")
    assert client.calls == 12 and [j["raw"] for j in js2] == [j["raw"] for j in js]
    s = judge_summary(items, js, cfg)
    assert s["statuses"] == {"ok": 11, "unparseable": 1}
    assert s["losses"] == 6 and s["ge_teacher"]["value"] == 0.0 and s["n_one_order"] == 1
    assert s["first_position"]["value"] == pytest.approx(100 * 6 / 11)
    rows = judge_rows(s, cfg, "fake", {"model": "m", "role": "imitation", "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.04})
    r = {x["metric_key"]: x for x in rows}
    assert r["judge_ge_teacher"]["n"] == 6 and "unparseable" in r["judge_ge_teacher"]["note"]
    assert r["judge_parse_rate"]["value"] == pytest.approx(100 * 11 / 12)


def test_length_controlled_rate_removes_length_effect():
    rng = np.random.default_rng(1)
    lt = rng.integers(50, 400, 600)
    lm = (lt * np.exp(rng.normal(0.5, 0.6, 600))).astype(int)
    ge = (np.log1p(lm) - np.log1p(lt) + rng.normal(0, 0.3, 600)) > 0
    assert ge.mean() > 0.7
    assert 35 < length_controlled_rate(ge, lm, lt) < 65


def test_join_inputs(tmp_path):
    refs = tmp_path / "refs.jsonl"; gens = tmp_path / "gens.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "1", "prompt": "p1", "reference": "r1", "reference2": "s1"},
                                                         {"id": "2", "prompt": "p2", "reference": "r2"}]))
    gens.write_text(json.dumps({"id": "1", "prompt": "p1", "output": "o1"}) + "\n")
    items, counts = join_inputs(gens, refs)
    assert [i["output"] for i in items] == ["o1"] and counts["missing_output"] == 1
    items2, _ = join_inputs(None, refs)            # teacher #2 vs teacher #1
    assert [(i["output"], i["reference"]) for i in items2] == [("s1", "r1")]


# ---------------------------------------------------------------- toxicity scorer
def test_offline_scorer_separates_extreme_rtp_continuations():
    from imitation_nb.eval_toxicity import auroc, extreme_continuations, get_scorer
    texts, labels = extreme_continuations(50)
    assert len(texts) == 100 and sum(labels) == 50
    scores = get_scorer("offline-jigsaw").score(texts)["toxicity"]
    a = auroc(scores, labels)
    print(f"offline-jigsaw AUROC on the 50 most vs 50 least toxic RTP continuations: {a:.3f}")
    assert a >= 0.9


def test_toxicity_metrics_and_rows():
    from imitation_nb.eval_toxicity import ToxicityConfig, toxicity_metrics, toxicity_rows
    m = toxicity_metrics([[0.9, 0.1], [0.2, 0.4], [0.6, 0.0]], threshold=0.5, n_boot=100)
    assert m["expected_max_toxicity"]["value"] == pytest.approx((0.9 + 0.4 + 0.6) / 3)
    assert m["toxicity_probability"]["value"] == pytest.approx(200 / 3)
    assert m["non_toxicity"]["value"] == pytest.approx(1 - np.mean([0.9, 0.1, 0.2, 0.4, 0.6, 0.0]))
    recs = [{"subset": "toxic", "scores": [0.9, 0.1]}, {"subset": "nontoxic", "scores": [0.2, 0.4]}]
    rows = toxicity_rows(recs, "scorer-x", ToxicityConfig(n_boot=50), {"model": "m", "role": "base"})
    assert {r["metric_key"] for r in rows} == {"expected_max_toxicity", "toxicity_probability", "non_toxicity"}
    assert len(rows) == 9 and all(r["evaluator"] == "scorer-x" for r in rows)


@pytest.mark.parametrize("reply,verdict", [("B", "B"), ("**A**.", "A"), ("C (tie)", "tie"), ("A is better.", "A"),
                                           ("A\n\nA\n\n", "A"), ("A good answer would", None), ("Both are fine", None)])
def test_parse_one_letter_replies(reply, verdict):
    assert parse_verdict(reply, letter=True)[0] == verdict
    if verdict in ("B", "tie"): assert parse_verdict(reply)[0] is None     # bare letters only count when asked for


def test_pairwise_stages_check_inputs_and_record_them(tmp_path):
    "eval_judge and style share input checks and manifest inputs; both run on real files with a scripted judge."
    import json as _json
    from imitation_nb import core
    from imitation_nb.eval_judge import run_eval_judge
    from imitation_nb.style import run_style
    prompts = ["List three prime numbers.", "What is the capital of France?", "Explain recursion briefly."]
    refs, gens = tmp_path / "refs.jsonl", tmp_path / "gens.jsonl"
    core.append_jsonl(refs, [{"id": f"p{i}", "prompt": p, "reference": f"Here is an answer.\n\n1. one\n2. two\n\nIn summary, {p}"}
                             for i, p in enumerate(prompts)])
    core.append_jsonl(gens, [{"id": f"p{i}", "prompt": p, "output": f"- a\n- b\n\nIn summary, {p}"} for i, p in enumerate(prompts)])
    subj = {"model": "smollm2-135m", "role": "imitation", "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.008}
    for run in (run_eval_judge, run_style):
        stage = "eval_judge" if run is run_eval_judge else "style"
        with pytest.raises(ValueError, match=f"{stage} needs references_file"):
            run("smoke", tmp_path / f"{stage}-x", subj, generations_file=gens, references_file=None)
        with pytest.raises(ValueError, match=f"{stage} needs generations_file"):
            run("smoke", tmp_path / f"{stage}-y", subj, generations_file=None, references_file=refs)
    # a judge that always prefers the first answer shown: the both-orders rule turns that into ties
    first = lambda msgs: ["[[A]]" if "[[A]]" in _json.dumps(m) else "A" for m in msgs]
    d = run_eval_judge("smoke", tmp_path / "judge", subj, gens, refs, chat_fn=first, judge_identity="scripted")
    m = core.read_manifest(d)
    assert m["status"] == "done" and set(m["inputs"]) == {"generations", "references"}
    assert m["params"]["generations_file"] == str(gens) and m["inputs"]["references"]["sha256"] == core.file_sha256(refs)
    d = run_style("smoke", tmp_path / "style", subj, gens, refs, chat_fn=lambda msgs: ["Yes"] * len(msgs),
                        judge_identity="scripted")
    m = core.read_manifest(d)
    assert m["status"] == "done" and set(m["inputs"]) == {"generations", "references"}
    df = core.read_results_file(d / "results.csv")
    assert df.set_index("metric_key").loc["style_list", "value"] == 100.0   # every reference has a list, so does every output


def test_tone_worked_examples_make_the_offline_judge_answer():
    """The real offline judge (SmolLM2-135M-Instruct, greedy, 8 tokens) on real ChatGPT answers from ShareGPT:
    with the two worked examples (`tone_shots=2`) nearly every reply is a parseable yes/no, clearly more than
    zero-shot (measured on 48 answers: 29 unparseable zero-shot, 2 with the examples)."""
    import itertools
    from imitation_nb.serve import LocalChatModel
    from imitation_nb.sources import load_sharegpt, sharegpt_wheel_path, Ledger
    from imitation_nb.style import tone_messages, parse_tone
    items = []
    for c in itertools.islice(load_sharegpt(sharegpt_wheel_path(), Ledger()), 2000):
        m = c["messages"]
        if len(m) >= 2 and m[0]["role"] == "human" and m[1]["role"] == "gpt" and len(m[0]["content"]) < 600:
            items.append((m[0]["content"], m[1]["content"][:200]))
        if len(items) == 16: break
    assert len(items) == 16                                  # raw ShareGPT roles: human / gpt
    judge = LocalChatModel("smollm2-135m-instruct")
    ask = lambda shots: [parse_tone(judge.generate(tone_messages(p, o, 400, shots), temperature=0.0, max_tokens=8)
                                    ["choices"][0]["message"]["content"]) for p, o in items]
    zero, two = ask(0), ask(2)
    parsed0, parsed2 = sum(v is not None for v in zero), sum(v is not None for v in two)
    assert parsed2 >= 14 and parsed2 > parsed0, (parsed0, parsed2)
    assert 0 < sum(v is True for v in two) < parsed2, two      # the verdicts discriminate: not all yes, not all no


def test_pairwise_plumbing_lives_once_in_pairwise():
    """Issue #19: judge and style share the pairwise plumbing through `imitation_nb.pairwise` — neither copies the
    stage skeleton, style does not import eval_judge, and each shared function is defined once in the package."""
    import ast
    pkg = Path(__file__).resolve().parents[1] / "imitation_nb"
    trees = {p.stem: ast.parse(p.read_text()) for p in pkg.glob("*.py") if p.stem != "_modidx"}
    def imported(mod):
        return {n.module.lstrip(".").split(".")[-1] if n.level else n.module.split(".")[-1]
                for n in ast.walk(trees[mod]) if isinstance(n, ast.ImportFrom) and n.module}
    def names(mod):
        return {n.id for n in ast.walk(trees[mod]) if isinstance(n, ast.Name)} | \
               {a.name for n in ast.walk(trees[mod]) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "pairwise" in imported("eval_judge") and "pairwise" in imported("style")
    assert "eval_judge" not in imported("style")
    for mod in ("eval_judge", "style"):      # the skeleton (run, profile, files written) is pairwise's alone
        assert not names(mod) & {"StageRun", "load_profile", "atomic_write_text", "to_json", "ChatClient"}, mod
    shared = {"join_inputs", "n_words", "client_chat_fn", "profile_judge", "close_client", "pair_stage_params", "pairwise_run"}
    defined = [n.name for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.FunctionDef) and n.name in shared]
    assert sorted(defined) == sorted(shared), defined


def test_pairwise_run_keeps_judgments_closes_the_judge_and_resumes(tmp_path):
    """A judge failing mid-stage: the run fails, the judge's client is closed, the judgments already made are
    kept; the rerun asks only for the missing ones and finishes in the same run directory."""
    import yaml
    from imitation_nb import core
    from imitation_nb.eval_judge import run_eval_judge
    prof = yaml.safe_load((core.configs_dir() / "smoke.yaml").read_text())
    prof["eval_judge"]["n_prompts"] = 0                        # every prompt: 10 prompts x 2 orders = 2 batches
    profile = tmp_path / "smoke-all.yaml"; profile.write_text(yaml.safe_dump(prof))
    refs, gens = tmp_path / "refs.jsonl", tmp_path / "gens.jsonl"
    core.append_jsonl(refs, [{"id": f"p{i}", "prompt": f"Question {i}?", "reference": f"Teacher answer {i}."} for i in range(10)])
    core.append_jsonl(gens, [{"id": f"p{i}", "prompt": f"Question {i}?", "output": f"Model answer {i}."} for i in range(10)])
    subj = {"model": "smollm2-135m", "role": "imitation", "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.008}
    class Client:
        counts = {"api_calls": 0}
        closed = 0
        def close(self): Client.closed += 1
    asked = []
    def flaky(msgs):            # the first batch (16 requests) is answered, the second fails
        if asked: raise ConnectionError("judge went away")
        asked.extend(msgs); Client.counts["api_calls"] += len(msgs); return ["[[B]]"] * len(msgs)
    flaky.client = Client()
    with pytest.raises(ConnectionError):
        run_eval_judge(profile, tmp_path / "run", subj, gens, refs, chat_fn=flaky, judge_identity="flaky")
    m = core.read_manifest(tmp_path / "run")
    assert m["status"] == "failed" and "judge went away" in m["error"] and Client.closed == 1
    assert len(core.read_jsonl(tmp_path / "run" / "judgments.jsonl")) == 16
    again = []
    def steady(msgs): again.extend(msgs); return ["[[B]]"] * len(msgs)
    d = run_eval_judge(profile, tmp_path / "run", subj, gens, refs, chat_fn=steady, judge_identity="steady")
    assert len(again) == 4 and core.read_manifest(d)["status"] == "done"
    m = core.read_manifest(d)
    assert m["extra"]["judge"] == "steady" and m["extra"]["client_counts"] == {} and m["extra"]["counts"]["joined"] == 10
    rows = core.read_results_file(d / "results.csv").set_index("metric_key")
    assert rows.loc["judge_parse_rate", "n"] == 20 and "W/T/L 0/10/0" in rows.loc["judge_ge_teacher", "note"]   # always B: ties
