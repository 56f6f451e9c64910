"""Issue 21, item 1: every length is capped at the base's context. A tiny GPT-2-architecture model with a 64-position
context (random weights, the embedded SmolLM2 tokenizer and chat template), created here with transformers, is
fine-tuned for a few real QLoRA steps through the `finetune` stage under a profile asking for 2,048-token blocks,
2,048-token held-out scoring and 4,096-token prompts + 100 new tokens; it is scored on held-out answers, generates
and is scored on MMLU. Before the caps, GPT-2's position table (64 rows) was indexed past its end: IndexError."""
import json, os, warnings
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.core import append_jsonl, read_jsonl
from imitation_nb.models import LengthCapWarning, load_tokenizer
from imitation_nb.sources import sharegpt_wheel

CTX = 64


@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory):
    "A GPT-2 (learned absolute positions, Conv1D layers) with n_positions=64, saved as a model folder."
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path_factory.mktemp("gpt2_64") / "model"
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=CTX, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(d); tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def profile(gpt2_64, tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml").read_text())
    raw["name"] = "ctx64"
    raw["models"] = {"gpt2-64": {"spec": str(gpt2_64), "family": "GPT-2", "params_b": 0.0001, "label": "GPT-2 64-ctx"}}
    raw["grid"]["data_sweep"]["base"] = "gpt2-64"; raw["grid"]["size_sweep"]["bases"] = ["gpt2-64"]
    raw["finetune"].update(block_size=2048, heldout_max_length=2048, per_device_batch_size=2, grad_accum=1,
                           max_steps=3, save_steps=2, warmup_steps=0, lora_r=4, lora_alpha=8, audit_examples=2,
                           heldout_max_examples=3)
    raw["finetune"].pop("loss_chunk_tokens", None)
    raw["generate"].update(max_prompt_tokens=4096, max_new_tokens=100, batch_size=2)
    p = d / "ctx64.yaml"; p.write_text(yaml.safe_dump(raw, sort_keys=False))
    append_jsonl(d / "train.jsonl", [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(6, max_chars=1500))])
    append_jsonl(d / "heldout.jsonl", sharegpt_wheel(3, skip=300, max_chars=1500))
    return p


def caps_warned(ws) -> list[str]:
    return [str(w.message) for w in ws if issubclass(w.category, LengthCapWarning)]


def test_finetune_score_generate_on_a_64_token_context(profile, tmp_path):
    from imitation_nb.finetune import run_finetune
    from imitation_nb.generate import run_generate
    d = profile.parent
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        rd = run_finetune(str(profile), tmp_path / "ft", base="gpt2-64", train_file=d / "train.jsonl",
                          heldout_file=d / "heldout.jsonl")
    msgs = caps_warned(ws)
    assert any("finetune.block_size=2048 exceeds the context" in m and "(64 tokens): capped to 64" in m for m in msgs), msgs
    s = json.loads((rd / "summary.json").read_text())
    assert s["block_size"] == CTX and s["steps"] == 3 and s["trained_tokens"] > 0
    assert s["length_caps"] == {"block_size": [2048, CTX], "heldout_max_length": [2048, CTX]}
    log = read_jsonl(rd / "train_log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in log if "loss" in r)
    held = json.loads((rd / "heldout.json").read_text())
    assert held["base"]["n_tokens"] > 0 and "after_final" in held            # scored, capped at 64 tokens
    assert (rd / "adapter" / "adapter_model.safetensors").exists()

    # generation with the trained adapter: 4,096-token prompts + 100 new tokens on a 64-token context
    subject = {"model": "gpt2-64", "adapter": str(rd / "adapter"), "role": "imitation", "model_family": "GPT-2",
               "base_params_b": 0.0001, "imitation_data": "ShareGPT-Mix", "data_tokens_m": 0.0, "label": "GPT-2 64"}
    prompts = tmp_path / "prompts.jsonl"
    append_jsonl(prompts, [{"id": f"p{i}", "messages": c["messages"][:1]} for i, c in enumerate(sharegpt_wheel(3, max_chars=1500))])
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        gd = run_generate(str(profile), tmp_path / "gen", subject, prompts)
    recs = read_jsonl(gd / "generations.jsonl")
    assert len(recs) == 3
    assert max(r["n_prompt_tokens"] for r in recs) == CTX // 2 and all(r["n_prompt_tokens"] + r["n_new_tokens"] <= CTX for r in recs)
    msgs = caps_warned(ws)
    assert any("max_new_tokens (with room for the prompt)=100" in m for m in msgs), msgs
    assert any("prompts capped to 32 tokens" in m for m in msgs), msgs


def test_mmlu_drops_exemplars_to_fit_a_short_context(gpt2_64, tmp_path):
    "MMLU's 5-shot prompts on a 64-token context: exemplars dropped (Hendrycks' rule), the rest cut from the left."
    from imitation_nb.eval_benchmarks import eval_mmlu, mmlu_questions
    from imitation_nb.generate import Generator
    gen = Generator(str(gpt2_64), backend="hf", device="cpu")
    qs = mmlu_questions(1, 2, seed=0)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        recs = eval_mmlu(gen, qs, 5, tmp_path / "mmlu.jsonl")
    assert len(recs) == 2 and all(r["shots"] == 0 and len(r["logprobs"]) == 4 for r in recs)
    assert any("exemplars dropped until they fit" in str(w.message) for w in ws)
    assert any(issubclass(w.category, LengthCapWarning) and "lose their start" in str(w.message) for w in ws)
