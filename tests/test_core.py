"Foundation: profiles, CLI, run records, paper data integrity, embedded models."
import hashlib, json, os, subprocess, sys, time
from pathlib import Path

import pytest

from imitation_nb import core

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-c", "import sys; from imitation_nb.core import main; sys.exit(main())", *args],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and r.returncode != 0: raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_every_profile_validates():
    r = cli("profiles", "--action", "validate")
    for name in ("smoke", "mini", "paper", "modern"): assert f"configs/{name}.yaml: ok" in r.stdout


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
    assert r.returncode != 0 and expect in r.stderr


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
