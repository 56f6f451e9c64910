"Foundation: profiles, CLI, run records, paper data integrity, embedded models."
import hashlib, json, os, subprocess, sys, time
from pathlib import Path

import pytest
import yaml

from imitation_nb import core

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.cli import main; sys.exit(main())", *args],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and r.returncode != 0: raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_every_profile_validates():
    r = cli("profiles", "--action", "validate", "--schema-only")
    for name in ("smoke", "mini", "paper", "modern"): assert f"configs/{name}.yaml: ok" in r.stdout
    # with the input check: smoke and mini find every file and model they name; paper and modern name the
    # user-supplied data (data/user/...), absent here, and hub models that cannot be checked offline
    r = cli("profiles", "--action", "validate", check=False)
    for name in ("smoke", "mini"): assert f"configs/{name}.yaml: ok" in r.stdout, r.stdout
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("configs/paper.yaml: key 'data.sharegpt[0]': data/user/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json "
            "not found") in r.stderr, r.stderr
    assert "models.llama-13b.spec: huggyllama/llama-13b (hub id, not checked)" in r.stdout, r.stdout


@pytest.mark.parametrize("edit,expect", [
    (("seed: 0", "sed: 0"), "unknown key 'sed' (did you mean 'seed'?)"),
    (("budgets_m:", "budget_m:"), "unknown key 'grid.data_sweep.budget_m'"),
    (("params_b: 0.135", "params_b: small"), "key 'models.smollm2-135m.params_b': expected a number"),
    (("base: smollm2-135m", "base: smollm3"), "key 'grid.data_sweep.base': 'smollm3' is not one of models"),
])
def test_profile_typos_name_file_and_key(tmp_path, edit, expect):
    src = (ROOT / "configs" / "smoke.yaml").read_text()
    assert edit[0] in src
    bad = tmp_path / "typo.yaml"; bad.write_text(src.replace(edit[0], edit[1], 1))
    with pytest.raises(core.ProfileError) as e: core.load_profile(bad)
    assert str(bad) in str(e.value) and expect in str(e.value), str(e.value)
    r = cli("profiles", "--action", "validate", "--name", str(bad), check=False)
    assert r.returncode == 2 and expect in r.stderr


def test_renamed_keys_name_the_new_key(tmp_path):
    "A key a dataclass lists in `_renamed` fails with the new key in the message (issue #19: mixtures.block_size)."
    from dataclasses import dataclass
    @dataclass
    class Section:
        _renamed = {"old": "new", "older": ("newer", "why it moved")}
        new: int = 0
        newer: int = 0
    assert core.build_dataclass(Section, {"new": 1, "newer": 2}, "sec") == Section(1, 2)
    with pytest.raises(core.ProfileError, match=r"^f\.yaml: key 'sec\.old' was renamed to 'sec\.new'$"):
        core.build_dataclass(Section, {"old": 1}, "sec", "f.yaml")
    with pytest.raises(core.ProfileError, match=r"key 'older' was renamed to 'newer' \(why it moved\)$"):
        core.build_dataclass(Section, {"older": 1}, "", "f.yaml")
    # every shipped profile uses the new key; an old one names file, old key and new key
    for name in core.list_profiles():
        assert "chunk_tokens" in core.load_profile(name).section("mixtures").__dataclass_fields__
        assert "block_size" not in yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["mixtures"]
    old = _smoke_copy(tmp_path, lambda raw: raw["mixtures"].update(block_size=raw["mixtures"].pop("chunk_tokens")), "old.yaml")
    with pytest.raises(core.ProfileError) as e: core.load_profile(old)
    assert str(e.value) == (f"{old}: key 'mixtures.block_size' was renamed to 'mixtures.chunk_tokens' "
                            "(it chunks conversations; finetune.block_size packs them)")


def test_paper_profile_encodes_the_papers_grid():
    p = core.load_profile("paper")
    assert [p.models[b].params_b for b in p.grid.size_sweep.bases] == [1.5, 7, 13]
    assert p.models[p.grid.data_sweep.base].spec == "huggyllama/llama-13b"
    assert p.grid.data_sweep.budgets_m == [0.3, 20, 80, 150] and p.grid.size_sweep.budget_m == 150


def test_paper_numbers_checksums_match_provenance():
    d = ROOT / "data" / "paper"
    for line in (d / "sha256sums.txt").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name


def test_manifest_and_results_for_a_stage_run(tmp_path):
    with core.StageRun("unit", {"k": 1, "seed": 3}, profile="smoke", root=tmp_path) as run:
        run.add_results({"metric_key": "mmlu_acc", "metric": "MMLU", "value": 31.0, "n": 200})
    m = json.loads((run.dir / "manifest.json").read_text())
    assert m["status"] == "done" and m["seed"] == 3 and m["params"] == {"k": 1, "seed": 3}
    for k in ("git", "versions", "wall_time_s", "peak_rss_mb", "hardware"): assert k in m
    assert m["versions"]["torch"] and m["versions"]["transformers"]
    assert run.dir.parent.parent.name == "smoke" and run.dir.name == core.stable_hash({"k": 1, "seed": 3})
    df = core.load_results(tmp_path)
    assert (df.source == "paper").sum() > 100
    rep = df[df.source == "reproduction"]
    assert rep.value.tolist() == [31.0] and rep.run_id.tolist() == [run.run_id]


def test_results_refuse_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_API_KEY", "sk-test-abcdefghijklmnop")
    with pytest.raises(ValueError, match="secret"):
        core.append_results([{"metric_key": "x", "value": 1, "note": "key sk-test-abcdefghijklmnop"}], tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()
    with pytest.raises(ValueError, match="looks like a secret"):
        core.StageRun("s", {"api_key": "abc"}, root=tmp_path)


def test_models_prepare_is_cached_and_listed():
    t0 = time.time(); r = cli("models", "prepare", "smollm2-135m-instruct"); dt = time.time() - t0
    assert "smollm2-135m-instruct" in r.stdout and (core.cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists()
    r = cli("models", "list")
    assert "smollm2-135m-instruct" in r.stdout and "gemma3-270m" in r.stdout


@pytest.mark.parametrize("name,bound", [("smollm2-135m-instruct", 25.0), ("gemma3-270m", 25.0)])
def test_embedded_models_are_real_language_models(name, bound):
    from imitation_nb.models import load_model, load_tokenizer, perplexity, shuffled, PPL_TEXT, model_cache
    model, tok = load_model(name), load_tokenizer(name)
    ppl, shuf = perplexity(model, tok), perplexity(model, tok, shuffled(PPL_TEXT))
    assert ppl < bound, ppl
    assert shuf > 20 * ppl, (ppl, shuf)
    meta = json.loads((model_cache(name) / "imitation_nb_model.json").read_text())
    assert meta["name"] == name and len(meta["gguf_sha256"]) == 64


def test_greedy_continuations_are_coherent_english():
    import torch
    from imitation_nb.models import load_model, load_tokenizer
    from imitation_nb.chat import render_chat
    tok, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")
    text = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    gtok, g = load_tokenizer("gemma3-270m"), load_model("gemma3-270m")
    ids = gtok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = g.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in gtok.decode(out[0, ids.input_ids.shape[1]:])


def test_unknown_command_and_help():
    r = cli("reproduc", check=False)
    assert r.returncode == 2 and "did you mean 'reproduce'" in r.stderr
    assert "reproduce" in cli("--help").stdout


def _smoke_copy(tmp_path, edit=None, name="edited.yaml"):
    "configs/smoke.yaml, optionally edited (a function of the parsed YAML), written to tmp_path/name."
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    if edit: edit(raw)
    p = tmp_path / name; p.write_text(yaml.safe_dump(raw, sort_keys=False)); return p


def _text_edit(tmp_path, old, new, name="bad.yaml"):
    src = (ROOT / "configs" / "smoke.yaml").read_text()
    assert old in src
    p = tmp_path / name; p.write_text(src.replace(old, new, 1)); return p


@pytest.mark.parametrize("edit,expect", [
    (("seed: 0", "sed: 0"), "unknown key 'sed' (did you mean 'seed'?)"),
    (("params_b: 0.135", "params_b: small"), "key 'models.smollm2-135m.params_b': expected a number"),
    (("  k: 2\n", "  k: [2\n  max_new_tokens: 12\n"), "not valid YAML"),
    (None, "profile not found (known profiles: gpu-smoke, mini, modern, paper, smoke)"),
    (("  chunk_tokens: 1024", "  block_size: 1024"), "key 'mixtures.block_size' was renamed to 'mixtures.chunk_tokens' "
                                                     "(it chunks conversations; finetune.block_size packs them)"),
])
def test_bad_profiles_print_one_line_exit_2_and_a_traceback_only_with_debug(tmp_path, edit, expect):
    bad = _text_edit(tmp_path, *edit) if edit else tmp_path / "no_such_profile.yaml"
    for cmd in (("profiles", "--action", "validate", "--name", str(bad)),
                ("reproduce", "--profile", str(bad), "--dry-run", "--runs", str(tmp_path / "runs"))):
        r = cli(*cmd, check=False)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (cmd, r.returncode, r.stderr)
        assert str(bad) in lines[0] and expect in lines[0], lines[0]
        d = cli("--debug", *cmd, check=False)
        assert d.returncode == 2 and "Traceback (most recent call last)" in d.stderr and expect in d.stderr, d.stderr
    assert not (tmp_path / "runs").exists()


def test_unexpected_errors_keep_their_traceback():
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb import cli; cli.list_profiles = lambda: 1 / 0; "
                        "sys.exit(cli.main(['profiles']))"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "ZeroDivisionError" in r.stderr


def test_unknown_action_and_missing_file_are_user_errors(tmp_path):
    r = cli("profiles", "--action", "validat", check=False)
    assert r.returncode == 2 and "unknown action 'validat'" in r.stderr and "Traceback" not in r.stderr
    r = cli("finetune", "smollm2-135m", str(tmp_path / "no_train.jsonl"), str(tmp_path / "out"), check=False)
    assert r.returncode == 2 and "no_train.jsonl" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _break_inputs(raw):
    raw["data"]["hc3"] = ["data/hc3/no_such_sample.csv"]
    raw["teacher"]["replay_paths"] = ["data/cache/gone.sqlite"]
    raw["models"]["gemma3-270m"]["spec"] = "/nonexistent/gemma-folder"
    raw["judge"]["local_server"] = "smollm2-135m-instrct"
    raw["models"]["smollm2-135m"]["spec"] = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_inputs_fail_validation_and_the_dry_run(tmp_path):
    bad = _smoke_copy(tmp_path, _break_inputs)
    expect = [f"{bad}: key 'data.hc3[0]': data/hc3/no_such_sample.csv not found ({ROOT / 'data/hc3/no_such_sample.csv'})",
              f"{bad}: key 'teacher.replay_paths[0]': data/cache/gone.sqlite not found",
              f"{bad}: key 'models.gemma3-270m.spec': /nonexistent/gemma-folder: local model folder not found",
              f"{bad}: key 'judge.local_server': 'smollm2-135m-instrct' is not an embedded model",
              "did you mean 'smollm2-135m-instruct'?"]
    r = cli("profiles", "--action", "validate", "--name", str(bad), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for e in expect: assert e in r.stderr, (e, r.stderr)
    assert "models.smollm2-135m.spec: HuggingFaceTB/SmolLM2-135M-Instruct (hub id, not checked)" in r.stdout, r.stdout
    r = cli("reproduce", "--profile", str(bad), "--dry-run", "--runs", str(tmp_path / "runs"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for e in expect: assert e in r.stderr, (e, r.stderr)
    assert "hub id, not checked" in r.stdout and "compute plan for 'smoke'" in r.stdout   # the plan is still shown
    assert not (tmp_path / "runs").exists()
    ok = cli("profiles", "--action", "validate", "--name", str(_smoke_copy(tmp_path, name="fine.yaml")))
    assert ok.returncode == 0 and ": ok" in ok.stdout
