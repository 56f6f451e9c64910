"""Tests of the human-evaluation kit (`imitation_nb.eval_human`, issue 8).

- a real headless Chromium rates a 10-item study as two raters (with a reload mid-study) → exactly 20 rows;
- aggregation of a fixture with known votes equals hand-computed majority, Fleiss' κ, Krippendorff's α,
  ≥-teacher share, position bias and human-vs-judge agreement;
- malformed submissions are refused with 4xx and write nothing;
- the MTurk CSV round-trips (export → simulated MTurk results → import → same aggregates as the page's db).
"""
import csv, json, math, random, socket, sqlite3, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imitation_nb.eval_human import (CHOICES, RatingsDB, Study, aggregate, build_study, capture_screenshot,
                                     export_mturk, import_mturk, load_pairs, load_ratings, make_app, result_rows,
                                     serve_in_thread)

FIX = Path(__file__).parent / "human_fixtures"
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)")
SUBJECT = {"model": "smollm2-135m", "role": "imitation", "model_family": "SmolLM2", "base_params_b": 0.135,
           "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.008, "label": "SmolLM2-135M"}


@pytest.fixture
def study10(tmp_path):
    "8 real pairs + 2 gold items = a 10-item study from the fixture generations/references."
    pairs = load_pairs(FIX / "generations.jsonl", FIX / "references.jsonl")
    return build_study(pairs, tmp_path / "study", seed=0, n_items=8, n_gold=2)


def choice_for(study, iid, verdict):
    "The button a rater presses to express `verdict` (model/tie/teacher) on item `iid`."
    if verdict == "tie": return "equal"
    return "A" if study.key[iid]["a_is"] == verdict else "B"


# --------------------------------------------------------------------------------------------------- browser
@pytest.mark.browser
@needs_chromium
def test_browser_two_raters_reload(study10, tmp_path):
    from imitation_nb.eval_human import chromium_browser
    db_path = tmp_path / "ratings.sqlite"
    dialogs = []
    with serve_in_thread(study10, db_path) as url, chromium_browser() as browser:
        assert url.startswith("http://127.0.0.1:")
        pages = {}
        for rater in ("alice", "bob"):           # two raters at once: separate browser contexts, interleaved
            ctx = browser.new_context()
            page = ctx.new_page(); page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{url}/")
            page.fill("#rater-id", rater)
            with page.expect_navigation(): page.click("button[type=submit]")
            assert page.inner_text("#progress") == "Item 1 of 10"
            pages[rater] = page
        keys = {"alice": ["a", "b", "e", "1", "2", "3"], "bob": None}
        for step in range(10):
            for rater, page in pages.items():
                if rater == "alice" and step == 4:   # reload mid-study: same item, same progress, nothing written
                    before = RatingsDB(db_path, study10.study_id).count()
                    shown = page.input_value("input[name=item_id]")
                    page.reload()
                    assert page.inner_text("#progress") == "Item 5 of 10"
                    assert page.input_value("input[name=item_id]") == shown
                    assert RatingsDB(db_path, study10.study_id).count() == before
                if rater == "bob" and step == 6:     # bob opens the page in a new session: resumes at item 7
                    other = browser.new_context().new_page()
                    other.goto(f"{url}/rate?rater=bob")
                    assert other.inner_text("#progress") == "Item 7 of 10"
                    assert other.input_value("input[name=item_id]") == page.input_value("input[name=item_id]")
                    other.context.close()
                assert page.inner_text("#progress") == f"Item {step + 1} of 10"
                with page.expect_navigation():
                    if keys[rater]: page.keyboard.press(keys[rater][step % len(keys[rater])])   # keyboard shortcuts
                    else: page.click(f"button[value={CHOICES[step % 3]}]")                      # mouse
        for rater, page in pages.items():
            assert "You have rated all 10 items" in page.inner_text("#done"), page.inner_text("main")
        # a rater coming back later (new session) resumes at the end, not at item 1
        page = browser.new_page(); page.goto(f"{url}/rate?rater=bob")
        assert "You have rated all 10 items" in page.inner_text("#done")
    assert dialogs == []                         # the XSS attempt in one answer never ran
    rows = RatingsDB(db_path, study10.study_id).judgements()
    assert len(rows) == 20
    for rater in ("alice", "bob"):
        mine = [r for r in rows if r["rater"] == rater]
        assert len(mine) == 10 and {r["item_id"] for r in mine} == set(study10.items)
        assert all(r["created"] and r["shown_at"] and "Chrome" in r["user_agent"] for r in mine)
    # alice's key sequence a b e 1 2 3 a b e 1 → A B equal A B equal A B equal A (in her item order)
    alice = [r["choice"] for r in rows if r["rater"] == "alice"]
    assert alice == ["A", "B", "equal", "A", "B", "equal", "A", "B", "equal", "A"]


@pytest.mark.browser
@needs_chromium
def test_screenshot(study10, tmp_path):
    out = capture_screenshot(study10, tmp_path / "fig7.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w == 1920 and h >= 900                  # 1280 css px × 1.5 device scale, full page
    assert not (study10.dir / "ratings.sqlite").exists()   # the screenshot writes no rating


# ------------------------------------------------------------------------------------------- known votes
def known_study(tmp_path):
    """5 real pairs p1..p5 and 2 gold items; which side is the model is fixed by hand:
    A is the model on p1, p3, p5 and the teacher on p2, p4. g1: identical answers (expect 'equal');
    g2: good answer on the left (expect 'A')."""
    items, key = [], []
    for i, a_is in zip(range(1, 6), ["model", "teacher", "model", "teacher", "model"]):
        items.append({"item_id": f"p{i}", "prompt": f"q{i}", "answer_a": "x", "answer_b": "y"})
        key.append({"item_id": f"p{i}", "prompt_id": f"k{i}", "kind": "pair", "a_is": a_is, "expected": None})
    items += [{"item_id": "g1", "prompt": "q", "answer_a": "z", "answer_b": "z"},
              {"item_id": "g2", "prompt": "q", "answer_a": "good", "answer_b": "bro ken"}]
    key += [{"item_id": "g1", "prompt_id": "k1", "kind": "gold_equal", "a_is": None, "expected": "equal"},
            {"item_id": "g2", "prompt_id": "k2", "kind": "gold_broken", "a_is": None, "expected": "A"}]
    meta = {"study_id": "st_known", "n_items": 5, "n_gold": 2, "question": "?"}
    return Study(tmp_path, meta, items, key)

# verdicts of raters r1, r2, r3 (all pass the gold items); r4 fails both gold items and votes 'teacher' on all
VOTES = {"p1": ["model", "model", "model"], "p2": ["model", "model", "tie"], "p3": ["tie", "tie", "teacher"],
         "p4": ["teacher", "teacher", "model"], "p5": ["model", "tie", "teacher"]}


def known_judgements(st):
    js = [{"rater": "r1", "item_id": "p4", "choice": choice_for(st, "p4", "model"), "created": "2026-01-01T00:00:00"}]
    t = 1   # r1's first p4 judgement ('model') is superseded by a later one ('teacher'): latest wins
    for iid, vs in VOTES.items():
        for k, v in enumerate(vs):
            js.append({"rater": f"r{k + 1}", "item_id": iid, "choice": choice_for(st, iid, v), "created": f"2026-01-02T00:00:{t:02d}"}); t += 1
    for k in (1, 2, 3):
        js += [{"rater": f"r{k}", "item_id": "g1", "choice": "equal", "created": "2026-01-03"},
               {"rater": f"r{k}", "item_id": "g2", "choice": "A", "created": "2026-01-03"}]
    js += [{"rater": "r4", "item_id": "g1", "choice": "A", "created": "2026-01-03"},
           {"rater": "r4", "item_id": "g2", "choice": "B", "created": "2026-01-03"}]
    js += [{"rater": "r4", "item_id": iid, "choice": choice_for(st, iid, "teacher"), "created": "2026-01-04"} for iid in VOTES]
    return js


def test_aggregation_known_votes(tmp_path):
    st = known_study(tmp_path)
    judge = [{"id": "k1", "verdict": "model"}, {"id": "k2", "verdict": "tie"}, {"id": "k3", "verdict": "tie"},
             {"id": "k4", "verdict": "teacher"}, {"id": "k5", "verdict": "teacher"}]
    agg = aggregate(st, known_judgements(st), judge=judge)
    s = agg["summary"]
    # gold filter: r1-r3 answer both gold items as expected (100%); r4 gets 0/2 < 0.5 → dropped
    acc = {d["rater"]: (d["gold_accuracy"], d["kept"]) for d in agg["raters"]}
    assert acc == {"r1": (1.0, True), "r2": (1.0, True), "r3": (1.0, True), "r4": (0.0, False)}
    # majority by hand: p1 3×model → model; p2 2 model + 1 tie → model; p3 2 tie + 1 teacher → tie;
    # p4 2 teacher + 1 model → teacher (r1's earlier 'model' is superseded); p5 model/tie/teacher: a 3-way split
    # → median of (−1, 0, +1) = 0 → tie
    assert [it["majority"] for it in agg["items"]] == ["model", "model", "tie", "teacher", "tie"]
    assert s["n_splits"] == 1
    # ≥ teacher: p1, p2, p3, p5 → 4/5 = 80 %; ±1 std = √(0.8·0.2/5) = √0.032 = 0.178885 → 17.8885 %
    assert s["ge_teacher"] == pytest.approx(80.0)
    assert s["ge_teacher_std"] == pytest.approx(17.88854, abs=1e-4)
    assert s["ge_teacher_ci_low"] <= 80.0 <= s["ge_teacher_ci_high"] and s["ge_teacher_ci_high"] == pytest.approx(100.0)
    assert (s["win"], s["tie"], s["loss"]) == pytest.approx((40.0, 40.0, 20.0))
    # Fleiss' κ by hand, categories (model, tie, teacher), 3 ratings per item:
    #   P_i = Σ n_ij(n_ij−1) / (3·2): p1 (3,0,0) → 6/6 = 1; p2 (2,1,0), p3 (0,2,1), p4 (1,0,2) → 2/6 each; p5 (1,1,1) → 0
    #   P̄ = (1 + 3·(1/3) + 0)/5 = 0.4;  p_j = (7, 4, 4)/15;  P_e = (49 + 16 + 16)/225 = 0.36
    #   κ = (0.4 − 0.36)/(1 − 0.36) = 0.0625
    assert s["fleiss_kappa"] == pytest.approx(0.0625)
    # Krippendorff's α (nominal) by hand: 15 pairable values; each unit with 3 values adds 1/(3−1) per ordered pair
    #   of different values: p1 0, p2 4·½ = 2, p3 2, p4 2, p5 6·½ = 3 → D_o = 9/15 = 0.6;
    #   D_e = (15² − (7² + 4² + 4²)) / (15·14) = 144/210;  α = 1 − 0.6/(144/210) = 1 − 0.875 = 0.125
    assert s["krippendorff_alpha_nominal"] == pytest.approx(0.125)
    # position bias (kept raters, non-'equal' judgements): p1 A,A,A → 3 left of 3; p2 (A = teacher) B,B,= → 0/2;
    #   p3 =,=,B → 0/1; p4 (A = teacher) A,A,B → 2/3; p5 A,=,B → 1/2 ⇒ 6 of 11 = 54.545 %
    assert (s["position_n"], s["position_left_share"]) == (11, pytest.approx(600 / 11))
    # human majority vs judge: (model, model, tie, teacher, tie) vs (model, tie, tie, teacher, teacher)
    #   exact agreement on p1, p3, p4 = 60 %; Cohen's κ: p_o = 0.6, p_e = (2·1 + 2·2 + 1·2)/25 = 0.32,
    #   κ = 0.28/0.68 = 0.41176; on "≥ teacher": (T,T,T,F,T) vs (T,T,T,F,F) → 80 %
    j = agg["judge"]
    assert (j["n"], j["agreement"], j["ge_agreement"]) == (5, pytest.approx(60.0), pytest.approx(80.0))
    assert j["cohen_kappa"] == pytest.approx(0.28 / 0.68)
    # without the gold filter r4's 'teacher' votes flip p3 (tie,tie,teacher,teacher → median −0.5 → teacher)
    # and p5 (model,tie,teacher,teacher → teacher): ≥ teacher = 2/5 = 40 %
    assert aggregate(st, known_judgements(st), min_gold_accuracy=0.0)["summary"]["ge_teacher"] == pytest.approx(40.0)
    # documented alternatives for the 3-way split: 'teacher' → p5 loses (60 %), 'drop' → 3 of 4 = 75 %
    assert aggregate(st, known_judgements(st), split_resolution="teacher")["summary"]["ge_teacher"] == pytest.approx(60.0)
    d = aggregate(st, known_judgements(st), split_resolution="drop")["summary"]
    assert (d["n_items_scored"], d["ge_teacher"]) == (4, pytest.approx(75.0))
    # result rows: the figure metric, stamped with the subject
    rows = {r["metric_key"]: r for r in result_rows(agg, SUBJECT)}
    r = rows["human_ge_teacher"]
    assert (r["value"], r["n"], r["role"], r["model"], r["imitation_data"]) == (80.0, 5, "imitation", "SmolLM2-135M", "ShareGPT-Mix")
    assert rows["human_fleiss_kappa"]["value"] == pytest.approx(0.0625)
    assert rows["human_judge_agreement"]["value"] == pytest.approx(60.0)


def test_aggregation_refuses_bad_input(tmp_path):
    st = known_study(tmp_path)
    with pytest.raises(ValueError, match="unknown item"):
        aggregate(st, [{"rater": "r", "item_id": "nope", "choice": "A"}])
    with pytest.raises(ValueError, match="judge verdict 1"):
        aggregate(st, known_judgements(st), judge=[{"id": "k1", "verdict": "better"}])


# ---------------------------------------------------------------------------------------- malformed POSTs
def test_malformed_submissions_write_nothing(study10, tmp_path):
    db_path = tmp_path / "r.sqlite"
    client = TestClient(make_app(study10, db_path))
    iid = study10.order[0]
    cases = [  # (body, kind, status, words in the message)
        ({"rater": "alice", "item_id": "it_unknown", "choice": "A"}, "json", 404, "unknown item_id"),
        ({"rater": "alice", "item_id": iid, "choice": "left"}, "json", 422, "choice must be one of"),
        ({"rater": "alice", "item_id": iid}, "json", 422, "choice must be one of"),
        ({"item_id": iid, "choice": "A"}, "json", 400, "missing rater"),
        ({"rater": "", "item_id": iid, "choice": "A"}, "json", 400, "missing rater"),
        ({"rater": "<script>", "item_id": iid, "choice": "A"}, "json", 400, "invalid rater id"),
        ({"rater": "alice", "choice": "A"}, "json", 400, "missing item_id"),
        ({"rater": "alice", "item_id": "it_unknown", "choice": "A"}, "form", 404, "unknown item_id"),
        ({"rater": "alice", "item_id": iid, "choice": "B better"}, "form", 422, "choice must be one of"),
        ({"item_id": iid, "choice": "A"}, "form", 400, "missing rater"),
    ]
    for body, kind, status, msg in cases:
        r = client.post("/rate", **({"json": body} if kind == "json" else {"data": body}), follow_redirects=False)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert msg in (r.json()["error"] if kind == "json" else r.text), (body, r.text)
    assert client.post("/rate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/rate", content=b"[1, 2]", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/rate", content=b"choice=A", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/rate", json={"rater": "a", "item_id": iid, "choice": "A"},
                       headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/rate", params={"rater": "bad rater!"}).status_code == 400
    assert client.get("/rate", params={"rater": "alice", "item": "it_unknown"}).status_code == 404
    assert RatingsDB(db_path, study10.study_id).count() == 0
    # …and a well-formed one is written (one row), so the zero above is not vacuous
    ok = client.post("/rate", json={"rater": "alice", "item_id": iid, "choice": "equal"})
    assert ok.status_code == 200 and ok.json()["rated"] == 1
    assert RatingsDB(db_path, study10.study_id).count() == 1


def test_page_is_blinded_and_escaped(study10, tmp_path):
    client = TestClient(make_app(study10, tmp_path / "r.sqlite"))
    seen = []
    for iid in study10.order:
        page = client.get("/rate", params={"rater": "carol", "item": iid})
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for word in ("teacher", "gold", "koala_", "SmolLM", "ChatGPT", "a_is"):
            assert word not in page.text, (word, iid)
        assert "<script>alert" not in page.text and "onerror=" not in page.text.replace("onerror=&quot;", "")
        seen.append(page.text)
    assert any("&lt;script&gt;alert" in p for p in seen)          # the fixture's XSS attempt, shown as text
    assert any('<pre><code class="language-python">' in p for p in seen)   # code blocks kept
    assert client.get("/static/rate.js").headers["content-type"].startswith("text/javascript")


# ------------------------------------------------------------------------------------------ MTurk round-trip
def simulate_mturk_results(hits_csv, out_csv, workers, choose):
    "An MTurk 'Download CSV' file: one row per assignment, inputs as Input.*, answers as Answer.*."
    with open(hits_csv, newline="", encoding="utf-8") as f: hits = list(csv.DictReader(f))
    cols = ["HITId", "HITTypeId", "Title", "Reward", "AssignmentId", "WorkerId", "AssignmentStatus", "AcceptTime",
            "SubmitTime", "WorkTimeInSeconds"] + [f"Input.{c}" for c in hits[0]] + ["Answer.choice", "Answer.item_id"]
    rows = []
    for h, hit in enumerate(hits):
        for w, worker in enumerate(workers):
            rows.append({"HITId": f"3H{h:04d}", "HITTypeId": "3T0001", "Title": "Which answer is better?",
                         "Reward": "$0.20", "AssignmentId": f"3A{h:04d}{w}", "WorkerId": worker,
                         "AssignmentStatus": "Approved", "AcceptTime": f"Wed Nov 22 10:{h:02d}:00 PST 2026",
                         "SubmitTime": f"Wed Nov 22 10:{h:02d}:{10 + w:02d} PST 2026", "WorkTimeInSeconds": "40",
                         **{f"Input.{c}": v for c, v in hit.items()}, "Answer.choice": choose(hit["item_id"], worker),
                         "Answer.item_id": hit["item_id"]})
    rows.append({**rows[0], "AssignmentId": "3REJECTED", "WorkerId": "SPAMMER", "AssignmentStatus": "Rejected",
                 "Answer.choice": "A"})   # rejected work is skipped
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=cols); wr.writeheader(); wr.writerows(rows)
    return rows


def test_mturk_roundtrip(study10, tmp_path):
    hits_csv, template = export_mturk(study10, tmp_path)
    with open(hits_csv, newline="", encoding="utf-8") as f: hits = list(csv.DictReader(f))
    assert len(hits) == 10 and [h["item_id"] for h in hits] == study10.order
    assert set(hits[0]) == {"item_id", "instruction", "answer_a", "answer_b", "question"}
    for h in hits:   # sanitised HTML, one line, no template placeholders or raw scripts
        assert "\n" not in h["answer_a"] + h["answer_b"] and "<script" not in h["answer_a"] + h["answer_b"]
        assert "${" not in h["answer_a"] + h["answer_b"]
    assert any("&lt;script&gt;" in h["answer_a"] + h["answer_b"] for h in hits)
    assert "${answer_a}" in template.read_text() and 'name="choice"' in template.read_text()
    # simulated crowd: 3 workers per HIT with seeded random choices (gold items answered correctly)
    rng = random.Random(7)
    truth = {}
    def choose(iid, worker):
        k = study10.key[iid]
        c = k["expected"] if k["expected"] else rng.choice(CHOICES)
        truth[(worker, iid)] = c
        return c
    workers = ["A1WORKERX", "A2WORKERY", "A3WORKERZ"]
    simulate_mturk_results(hits_csv, tmp_path / "results.csv", workers, choose)
    imported = import_mturk(study10, tmp_path / "results.csv")
    assert len(imported) == 30 and {(j["rater"], j["item_id"]): j["choice"] for j in imported} == truth
    assert imported[0]["created"].endswith("+00:00") and imported[0]["source"].startswith("mturk:")
    # the same judgements entered through the page's database
    db = RatingsDB(tmp_path / "page.sqlite", study10.study_id)
    client = TestClient(make_app(study10, db.path))
    for (worker, iid), c in truth.items():
        assert client.post("/rate", json={"rater": worker, "item_id": iid, "choice": c}).status_code == 200
    via_csv = aggregate(study10, load_ratings(study10, tmp_path / "results.csv"))
    via_db = aggregate(study10, load_ratings(study10, db.path))
    for k in ("ge_teacher", "ge_teacher_std", "ge_teacher_ci_low", "ge_teacher_ci_high", "fleiss_kappa",
              "krippendorff_alpha_nominal", "position_left_share", "n_items_scored", "n_raters_kept", "gold_accuracy_mean"):
        a, b = via_csv["summary"][k], via_db["summary"][k]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), k
    assert [it["majority"] for it in via_csv["items"]] == [it["majority"] for it in via_db["items"]]
    assert via_csv["summary"]["n_items_scored"] == 8 and via_csv["summary"]["gold_accuracy_mean"] == 1.0


def test_mturk_import_errors_name_the_line(study10, tmp_path):
    hits_csv, _ = export_mturk(study10, tmp_path)
    rows = simulate_mturk_results(hits_csv, tmp_path / "ok.csv", ["W1"], lambda i, w: "A")
    def write(mutate):
        rs = [dict(r) for r in rows]; mutate(rs[3])
        p = tmp_path / "bad.csv"
        with open(p, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0])); wr.writeheader(); wr.writerows(rs)
        return p
    with pytest.raises(ValueError, match=r"line 5: unknown item_id"):
        import_mturk(study10, write(lambda r: r.update({"Input.item_id": "zz", "Answer.item_id": "zz"})))
    with pytest.raises(ValueError, match=r"line 5: Answer.choice must be one of"):
        import_mturk(study10, write(lambda r: r.update({"Answer.choice": "maybe"})))
    with pytest.raises(ValueError, match=r"line 5: missing WorkerId"):
        import_mturk(study10, write(lambda r: r.update({"WorkerId": ""})))
    # crowd-html radio buttons: Answer.choice.A / .B / .equal booleans instead of Answer.choice
    p = tmp_path / "crowd.csv"
    with open(p, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["AssignmentId", "WorkerId", "Input.item_id", "Answer.choice.A",
                                           "Answer.choice.B", "Answer.choice.equal"])
        wr.writeheader(); wr.writerow({"AssignmentId": "x", "WorkerId": "W", "Input.item_id": study10.order[0],
                                       "Answer.choice.A": "false", "Answer.choice.B": "true", "Answer.choice.equal": "false"})
    assert [j["choice"] for j in import_mturk(study10, p)] == ["B"]


def test_study_is_seeded_and_blinded(tmp_path):
    pairs = load_pairs(FIX / "generations.jsonl", FIX / "references.jsonl")
    a = build_study(pairs, tmp_path / "a", seed=0, n_items=10, n_gold=2)
    b = build_study(pairs, tmp_path / "b", seed=0, n_items=10, n_gold=2)
    c = build_study(pairs, tmp_path / "c", seed=1, n_items=10, n_gold=2)
    assert a.study_id == b.study_id and a.key == b.key and a.study_id != c.study_id
    # the left/right side is recorded per item and actually varies
    sides = [k["a_is"] for k in a.key.values() if k["kind"] == "pair"]
    assert set(sides) == {"model", "teacher"}
    for iid, k in a.key.items():
        it, p = a.items[iid], {p["id"]: p for p in pairs}[k["prompt_id"]]
        if k["kind"] == "pair":
            assert (it["answer_a"], it["answer_b"]) == ((p["model"], p["teacher"]) if k["a_is"] == "model" else (p["teacher"], p["model"]))
        elif k["kind"] == "gold_equal":
            assert it["answer_a"] == it["answer_b"] and k["expected"] == "equal"
        else:
            good = it["answer_a"] if k["expected"] == "A" else it["answer_b"]
            bad = it["answer_b"] if k["expected"] == "A" else it["answer_a"]
            assert good == p["teacher"] and bad != good and len(set(bad.split())) < len(bad.split())
    assert all(set(json.loads(l)) == {"item_id", "prompt", "answer_a", "answer_b"}
               for l in (a.dir / "items.jsonl").read_text().splitlines())


# -------------------------------------------------------------------------------------------------- CLI
def test_rate_cli_serves_on_loopback(study10, tmp_path):
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())",
                             "rate", str(study10.dir), "--port", str(port), "--db", str(tmp_path / "cli.sqlite")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    health = json.loads(r.read()); break
            except OSError: time.sleep(0.1)
        else: pytest.fail("rate server did not come up: " + (proc.poll() is not None and proc.stdout.read() or ""))
        assert health == {"ok": True, "study_id": study10.study_id, "items": 10}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/rate", method="POST", headers={"content-type": "application/json"},
                                     data=json.dumps({"rater": "cli", "item_id": study10.order[0], "choice": "A"}).encode())
        with urllib.request.urlopen(req, timeout=5) as r: assert json.loads(r.read())["rated"] == 1
    finally:
        proc.terminate(); proc.wait(timeout=10)
    assert RatingsDB(tmp_path / "cli.sqlite", study10.study_id).count() == 1


def test_concurrent_raters_on_real_server(study10, tmp_path):
    "Four raters submitting at the same time to the uvicorn server: every judgement is stored exactly once."
    import threading, httpx
    db_path = tmp_path / "conc.sqlite"
    errors = []
    with serve_in_thread(study10, db_path) as url:
        def rate_all(rater):
            with httpx.Client(base_url=url, timeout=30) as c:
                for n in range(10):
                    nxt = c.get("/api/progress", params={"rater": rater}).json()["next_item"]
                    r = c.post("/rate", json={"rater": rater, "item_id": nxt, "choice": CHOICES[n % 3]})
                    if r.status_code != 200: errors.append((rater, r.status_code, r.text))
                done = c.get("/api/progress", params={"rater": rater}).json()
                if done["rated"] != 10 or done["next_item"] is not None: errors.append((rater, done))
        threads = [threading.Thread(target=rate_all, args=(f"rater{k}",)) for k in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
    assert errors == []
    rows = RatingsDB(db_path, study10.study_id).judgements()
    assert len(rows) == 40 and len({(r["rater"], r["item_id"]) for r in rows}) == 40


def test_load_pairs_accepts_chat_rendered_prompts_and_still_rejects_others(tmp_path):
    "Generations store the exact text fed to the model (the SmolLM2 chat rendering); a different prompt is still an error."
    from imitation_nb.generate import render_prompt
    from imitation_nb.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    q = "Help me design an aesthetic and comfortable living room."
    rendered, _ = render_prompt(tok, {"prompt": q}, "on")
    assert rendered != q and q in rendered and "<|im_start|>" in rendered
    refs, gens = tmp_path / "refs.jsonl", tmp_path / "gens.jsonl"
    refs.write_text(json.dumps({"id": "p0", "prompt": q, "reference": "Start with a neutral palette."}) + "\n")
    gens.write_text(json.dumps({"id": "p0", "prompt": rendered, "output": "Use plants."}) + "\n")
    pairs = load_pairs(gens, refs)
    assert pairs == [{"id": "p0", "prompt": q, "model": "Use plants.", "teacher": "Start with a neutral palette."}]
    gens.write_text(json.dumps({"id": "p0", "prompt": rendered.replace("living room", "kitchen"), "output": "x"}) + "\n")
    with pytest.raises(ValueError, match="the prompt differs"):
        load_pairs(gens, refs)
