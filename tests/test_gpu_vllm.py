"""Issue 21, item 4: the vLLM code path. vLLM cannot be installed on this CPU machine (it needs CUDA, and its current
release pins an older transformers than this project's), so its three classes (`LLM`, `SamplingParams`,
`LoRARequest`) are replaced at the module boundary by a stand-in backed by a real transformers model: it returns real
prompt log-probabilities and greedy continuations, and records the engine arguments it was built with.
Checked: max_lora_rank from the adapter's rank (not a constant 64), max_model_len from the model's context, the HF
fallback for a GPT-2 LoRA adapter (vLLM has none), and MMLU through vLLM scored by next-token log-probs equal to
the HF backend's, with rows that say so. Before: MMLU through vLLM generated 2 tokens and read a letter, while its
rows said 'next-token log-prob'."""
import importlib.machinery, os, sys, types, warnings
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from imitation_nb.models import load_tokenizer, tiny_random_model


class FakeLLM:
    "Stand-in for `vllm.LLM` (the documented constructor keywords, `generate`, `get_tokenizer`)."
    instances = []

    def __init__(self, model, dtype="auto", seed=0, enable_lora=False, max_model_len=None, max_lora_rank=16,
                 gpu_memory_utilization=0.9):
        from imitation_nb.generate import load_lm
        self.kw = dict(model=model, dtype=dtype, seed=seed, enable_lora=enable_lora, max_model_len=max_model_len,
                       max_lora_rank=max_lora_rank, gpu_memory_utilization=gpu_memory_utilization)
        self.base, self.tok = load_lm(model, device="cpu")
        self.loras = {}
        FakeLLM.instances.append(self)

    def get_tokenizer(self): return self.tok

    def _model(self, lora):
        if lora is None: return self.base
        from imitation_nb.generate import load_lm
        if lora.lora_path not in self.loras: self.loras[lora.lora_path] = load_lm(self.kw["model"], lora.lora_path, device="cpu")[0]
        return self.loras[lora.lora_path]

    def generate(self, prompts, sp, lora_request=None, use_tqdm=False):
        assert lora_request is None or self.kw["enable_lora"], "a LoRA request on an engine built without enable_lora"
        m, out = self._model(lora_request), []
        for p in prompts:
            ids = p["prompt_token_ids"]
            assert self.kw["max_model_len"] is None or len(ids) + sp.max_tokens <= self.kw["max_model_len"] + 1
            x = torch.tensor([ids])
            with torch.no_grad():
                lp = torch.log_softmax(m(x).logits[0].float(), -1)
                new = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=sp.max_tokens, do_sample=False,
                                 pad_token_id=self.tok.pad_token_id)[0, len(ids):].tolist()
            pl = None
            if sp.prompt_logprobs is not None:
                pl = [None] + [{ids[k]: SimpleNamespace(logprob=lp[k - 1, ids[k]].item())} for k in range(1, len(ids))]
            out.append(SimpleNamespace(prompt_logprobs=pl, outputs=[SimpleNamespace(
                text=self.tok.decode(new, skip_special_tokens=True), token_ids=new, finish_reason="length")]))
        return out


class FakeSamplingParams:
    def __init__(self, temperature=1.0, top_p=1.0, max_tokens=16, stop=None, seed=None, prompt_logprobs=None):
        self.temperature, self.top_p, self.max_tokens, self.stop, self.seed = temperature, top_p, max_tokens, stop, seed
        self.prompt_logprobs = prompt_logprobs


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path): self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


@pytest.fixture
def fake_vllm(monkeypatch):
    mods = {n: types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request")}
    for n, m in mods.items(): m.__spec__ = importlib.machinery.ModuleSpec(n, None); monkeypatch.setitem(sys.modules, n, m)
    mods["vllm"].LLM, mods["vllm"].SamplingParams = FakeLLM, FakeSamplingParams
    mods["vllm.lora.request"].LoRARequest = FakeLoRARequest
    import imitation_nb.generate as G                                     # "vLLM and a GPU": what the backend choice
    monkeypatch.setattr(G, "_vllm_env", lambda: (True, True), raising=False)   # reads; models still load on this CPU
    monkeypatch.setattr(G, "_vllm_usable", lambda device="auto": device != "cpu")   # (the code before #21 read this)
    FakeLLM.instances.clear()
    return FakeLLM


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    "A tiny SmolLM2-architecture (llama) model and a tiny GPT-2 (64 positions), each with a rank-4 LoRA adapter."
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path_factory.mktemp("vllm_models")
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    llama = tiny_random_model("smollm2-135m-instruct")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    out = {}
    for name, m in (("llama", llama), ("gpt2", gpt2)):
        m.save_pretrained(d / name); tok.save_pretrained(d / name)
        get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(d / f"{name}_lora")
        out[name], out[f"{name}_lora"] = str(d / name), str(d / f"{name}_lora")
    return out


def test_engine_args_from_adapter_and_context(fake_vllm, models):
    from imitation_nb.generate import Generator
    g = Generator(models["llama"], adapter=models["llama_lora"], lora_r=64)      # the profile says 64, the adapter has 4
    assert g.backend == "vllm"
    kw = fake_vllm.instances[-1].kw
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_model_len"]) == (True, 8, 8192), kw
    g2 = Generator(models["gpt2"])                                                # GPT-2 base, no adapter: vLLM
    assert g2.backend == "vllm" and fake_vllm.instances[-1].kw["max_model_len"] == 64
    recs = g2.generate([{"id": "a", "prompt": "word " * 200}], max_new_tokens=100, progress=False)
    assert recs[0]["n_prompt_tokens"] == 32 and recs[0]["n_new_tokens"] == 32


def test_gpt2_lora_falls_back_to_hf(fake_vllm, models):
    from imitation_nb.generate import Generator
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        g = Generator(models["gpt2"], adapter=models["gpt2_lora"], backend="vllm")
    assert g.backend == "hf" and g.model is not None and not fake_vllm.instances
    assert any("vLLM has no LoRA support for gpt2" in str(w.message) for w in ws)


def test_mmlu_through_vllm_is_next_token_logprob(fake_vllm, models, tmp_path):
    from imitation_nb.eval_benchmarks import eval_mmlu, mmlu_questions, mmlu_rows, mmlu_summary
    from imitation_nb.generate import Generator
    qs = mmlu_questions(2, 2, seed=0)
    v = Generator(models["llama"], adapter=models["llama_lora"])
    assert v.backend == "vllm"
    rv = eval_mmlu(v, qs, 5, tmp_path / "vllm.jsonl")
    rh = eval_mmlu(Generator(models["llama"], adapter=models["llama_lora"], backend="hf", device="cpu"), qs, 5,
                   tmp_path / "hf.jsonl")
    assert all(r["logprobs"] is not None for r in rv), rv[0]
    for a, b in zip(rv, rh):
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3 and a["pred"] == b["pred"]
    from imitation_nb.eval_benchmarks import MMLU_EVALUATOR
    s = mmlu_summary(rv)
    assert s["method"] == "logprob" and {r["evaluator"] for r in mmlu_rows(s, {}, 5)} == {MMLU_EVALUATOR["logprob"]}
