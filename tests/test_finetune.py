"""Done-when tests of issue 5 (fine-tuning). Real models (SmolLM2-135M-Instruct, Gemma 3 270M's tokenizer), real
ShareGPT conversations, real optimizer steps; kept short (few steps, short blocks)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from imitation_nb.core import append_jsonl
from imitation_nb.finetune import MaskingAuditError, audit_masking, finetune, heldout_loss, merge_adapter
from imitation_nb.sources import read_conversations, sharegpt_wheel

ROOT = Path(__file__).resolve().parents[1]
SPEC = "smollm2-135m-instruct"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

# an assistant turn that quotes the user's question after the answer: user text inside the trained turn
BROKEN_ECHO = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
               "{{ '<|im_start|>assistant\\n' + message['content'] + '\\n(in reply to: ' + messages[loop.index0 - 1]['content'] + ')<|im_end|>\\n' }}"
               "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# an assistant turn rendered without its content (nothing of the teacher would be learned)
BROKEN_DROP = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
               "{{ '<|im_start|>assistant\\n' + message['content'][:3] + '<|im_end|>\\n' }}"
               "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
               "{% endfor %}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    train = [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(40, max_chars=2500))]
    append_jsonl(d / "train.jsonl", train)
    append_jsonl(d / "heldout.jsonl", sharegpt_wheel(6, skip=300, max_chars=1500))
    return d


def tiny_cfg(**kw):
    base = dict(method="lora", block_size=32, per_device_batch_size=1, grad_accum=1, max_steps=4, save_steps=2,
                lr=2e-3, lora_dropout=0.05, audit_examples=3, heldout_max_examples=0, torch_threads=2,
                max_train_conversations=20)
    base.update(kw)
    return base


def test_masking_audit_real_templates_pass_broken_fail():
    from imitation_nb.models import load_tokenizer
    convs = sharegpt_wheel(5)
    tok = load_tokenizer(SPEC)
    st = audit_masking(tok, convs, None, n=5)
    assert st["ok"] and st["assistant_tokens"] > 200
    for broken in (BROKEN_ECHO, BROKEN_DROP):
        with pytest.raises(MaskingAuditError):
            audit_masking(tok, convs, broken, n=5)
    gtok = load_tokenizer("gemma3-270m")
    st = audit_masking(gtok, convs, "gemma3-plain", n=5)
    assert st["ok"] and st["assistant_tokens"] > 200


@pytest.mark.parametrize("attention", ["sdpa", "packed_sdpa"])
def test_packed_document_is_independent_on_the_real_model(attention):
    from imitation_nb.models import load_model, load_tokenizer
    from imitation_nb.train_kernels import register_packed_attention
    register_packed_attention()
    tok = load_tokenizer(SPEC)
    m = load_model(SPEC, dtype="float32", attn_implementation=attention)
    assert m.config._attn_implementation == attention
    a = tok("The cat sat on the mat and looked at the birds outside.", return_tensors="pt").input_ids
    b = tok("Photosynthesis turns light into chemical energy.", return_tensors="pt").input_ids
    pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    with torch.no_grad():
        lp = m(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits[0, a.shape[1]:]
        lb = m(input_ids=b, use_cache=False).logits[0]
    assert (lp - lb).abs().max().item() < 1e-4
    if attention == "packed_sdpa":          # each piece is computed exactly as if it were alone
        assert torch.equal(lp, lb)


def test_trainer_kernels_keep_the_loss_and_gradients_on_real_packed_blocks():
    """The trainer's default model (packed_sdpa attention, fused LoRA layers, FastDropout masks) gives the loss and
    LoRA gradients of the plain peft model (transformers' masked SDPA, peft's forward, torch's dropout) on real
    packed ShareGPT blocks with dropout off; with dropout on, the fused layers draw the same masks as FastDropout
    in peft's forward and give the same loss and gradients. LoRA weights are set from one seed, lora_B non-zero so that
    every adapter matters."""
    from imitation_nb.finetune import (BlockCollator, FinetuneConfig, build_model, encode_conversations, pack_blocks,
                                       _lm_loss_chunked)
    from imitation_nb.models import load_tokenizer
    from imitation_nb.train_kernels import QUERY_CHUNK, fused_lora_forward, packed_pieces
    tok = load_tokenizer(SPEC)
    blocks = pack_blocks(encode_conversations(tok, sharegpt_wheel(12, max_chars=2500)), 512, pad_id=tok.pad_token_id)
    multi = [b for b in blocks if b["n_docs"] > 1][:2]
    assert len(multi) == 2                  # the comparison covers blocks holding several conversations ...
    longest = max(max(e - s for s, e in packed_pieces(torch.tensor([b["position_ids"]]))[0]) for b in multi)
    assert longest > 2 * QUERY_CHUNK        # ... and a piece long enough to be computed in query chunks
    batch = BlockCollator(tok.pad_token_id)(multi)

    def run(**kw):
        model, _ = build_model(SPEC, FinetuneConfig(method="lora", **kw), "cpu")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.train(); torch.manual_seed(0)
        loss = _lm_loss_chunked(model, batch, 512)
        loss.backward()
        fused = sum(getattr(m.forward, "__func__", None) is fused_lora_forward for m in model.modules())
        return (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                model.config._attn_implementation, fused)

    def close(a, b, tol):
        assert abs(a[0] - b[0]) < 1e-5 * abs(b[0])
        num = sum((a[1][n] - b[1][n]).square().sum() for n in b[1]) ** 0.5
        den = sum(b[1][n].square().sum() for n in b[1]) ** 0.5
        assert den > 0 and num / den < tol, num / den
        assert all(b[1][n].abs().max() > 0 for n in b[1])            # every LoRA weight gets a gradient

    plain = run(lora_dropout=0.0, attention="sdpa", fast_dropout=False, fused_lora=False)
    ours = run(lora_dropout=0.0)
    assert (plain[2], plain[3]) == ("sdpa", 0) and (ours[2], ours[3]) == ("packed_sdpa", 7 * 30)
    close(ours, plain, 1e-4)
    drop_peft = run(lora_dropout=0.05, fused_lora=False)          # peft's forward with FastDropout
    drop_ours = run(lora_dropout=0.05)
    close(drop_ours, drop_peft, 1e-4)
    assert abs(drop_ours[0] - ours[0]) > 1e-4 * abs(ours[0])      # dropout did change the loss
    model, _ = build_model(SPEC, FinetuneConfig(method="lora", lora_dropout=0.05), "cpu")
    names = [type(d).__name__ for mod in model.modules() if hasattr(mod, "lora_dropout") for d in mod.lora_dropout.values()]
    assert len(names) == 7 * 30 and set(names) == {"FastDropout"}


def test_fused_lora_on_a_real_4bit_base_matches_peft():
    """QLoRA (bitsandbytes NF4 base): the fused layers take the in-place LoraBranch path and give the loss and LoRA
    gradients of peft's own forward with the same dropout masks, on real ShareGPT tokens."""
    from imitation_nb.finetune import FinetuneConfig, build_model, encode_conversations, _lm_loss_chunked
    from imitation_nb.models import load_tokenizer
    from imitation_nb.train_kernels import fused_lora_forward
    tok = load_tokenizer(SPEC)
    e = encode_conversations(tok, sharegpt_wheel(4, max_chars=1500))[0]
    n = min(192, len(e["input_ids"]))
    batch = {"input_ids": torch.tensor([e["input_ids"][:n]]), "labels": torch.tensor([e["labels"][:n]])}
    assert (batch["labels"] != -100).sum() > 20
    got = {}
    for fused in (False, True):
        model, _ = build_model(SPEC, FinetuneConfig(method="qlora", lora_dropout=0.05, fused_lora=fused), "cpu")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name: p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.train(); torch.manual_seed(0)
        loss = _lm_loss_chunked(model, batch, 256); loss.backward()
        bound = [m for m in model.modules() if getattr(m.forward, "__func__", None) is fused_lora_forward]
        assert len(bound) == (7 * 30 if fused else 0)
        if fused: assert type(bound[0].base_layer).__name__ == "Linear4bit"
        got[fused] = loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert abs(got[True][0] - got[False][0]) < 1e-5 * abs(got[False][0])
    g0, g1 = got[False][1], got[True][1]
    num = sum((g0[k] - g1[k]).square().sum() for k in g0) ** 0.5
    den = sum(g0[k].square().sum() for k in g0) ** 0.5
    assert den > 0 and num / den < 1e-4, num / den


def test_packed_attention_keeps_gemma3_sliding_windows_on_real_conversations():
    """Gemma 3 270M (sliding-window layers of 512 tokens between global ones): a real ShareGPT conversation
    longer than the window, packed after another one, gets the logits of transformers' masked SDPA and of the
    conversation run alone from packed_sdpa (query chunks, window mask); without the window they would differ."""
    from imitation_nb.finetune import encode_conversations
    from imitation_nb.models import load_model, load_tokenizer
    from imitation_nb.train_kernels import register_packed_attention
    register_packed_attention()
    tok = load_tokenizer("gemma3-270m")
    enc = encode_conversations(tok, sharegpt_wheel(60), "gemma3-plain")
    m = load_model("gemma3-270m", dtype="float32")
    window = m.config.sliding_window
    long = next(e["input_ids"][:window + 200] for e in enc if len(e["input_ids"]) > window + 200)
    short = next(e["input_ids"][:120] for e in enc if 60 < len(e["input_ids"]))
    ids = torch.tensor([short + long])
    pos = torch.cat([torch.arange(len(short)), torch.arange(len(long))])[None]
    out = {}
    with torch.no_grad():
        for impl in ("sdpa", "packed_sdpa"):
            m.set_attn_implementation(impl)
            out[impl] = m(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = m(input_ids=torch.tensor([long]), use_cache=False).logits[0]
    scale = out["sdpa"].abs().max().item()
    assert (out["packed_sdpa"] - out["sdpa"]).abs().max().item() < 1e-4 * scale
    # alone (packed_sdpa too): equal up to the float rounding of matrix products over a different row count
    assert (out["packed_sdpa"][len(short):] - alone).abs().max().item() < 1e-4 * scale
    # the window matters here: full causal attention over the long piece gives other logits
    m.config.sliding_window = 10 ** 6
    for layer in m.model.layers: layer.self_attn.sliding_window = None
    with torch.no_grad():
        no_window = m(input_ids=torch.tensor([long]), use_cache=False).logits[0]
    assert (no_window[window:] - alone[window:]).abs().max().item() > 1e-3 * scale


def test_smoke_qlora_trained_loss_falls_and_adapter_reloads(data, tmp_path):
    """Real QLoRA steps lower the loss on the conversations they trained on, and the adapter reloads exactly.
    (The held-out drop on real ChatGPT answers is asserted by the end-to-end smoke grid, which trains on ~10x more
    tokens: at 12 steps of 2 x 128 tokens it is within noise on some CPUs.)"""
    from imitation_nb.models import load_model, load_tokenizer
    out = tmp_path / "run"
    seen = tmp_path / "seen.jsonl"
    append_jsonl(seen, read_conversations(data / "train.jsonl", 3))       # the first trained conversations
    s = finetune(SPEC, data / "train.jsonl", tiny_cfg(method="qlora", block_size=128, per_device_batch_size=2,
                                                       max_steps=12, lr=1e-3, save_steps=6, heldout_max_examples=3,
                                                       heldout_max_length=128, max_train_conversations=40),
                 out, heldout_data=seen)
    assert s["params"]["trainable"] < 0.1 * s["params"]["total"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "masking_audit.txt").exists()
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    held = json.loads((out / "heldout.json").read_text())
    b, a = held["base"], held["after_final"]
    diffs = [x - y for x, y in zip(b["per_conversation"], a["per_conversation"])]
    assert b["loss"] - a["loss"] > 0.05, (b["loss"], a["loss"])             # measurably lower, on every one
    assert all(d > 0 for d in diffs), diffs
    # the saved adapter reloads (on a freshly quantized base) with identical logits -> identical loss
    tok = load_tokenizer(SPEC)
    m = load_model(SPEC, quantization="nf4", adapter=str(out / "adapter"))
    again = heldout_loss(m, tok, read_conversations(seen, 3), None, 128)
    assert abs(again["loss"] - a["loss"]) < 1e-5, (again["loss"], a["loss"])


def _run_script(out, cfg, budgets=None, train=None):
    return (f"import torch; torch.set_num_threads(2)\n"
            f"from imitation_nb.finetune import finetune\n"
            f"finetune({SPEC!r}, {str(train)!r}, {cfg!r}, {str(out)!r}, save_at_budgets_m={budgets!r})\n")


def test_kill_and_resume_matches_uninterrupted(data, tmp_path):
    from safetensors.torch import load_file
    cfg = tiny_cfg()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ref = tmp_path / "ref"
    finetune(SPEC, data / "train.jsonl", cfg, ref)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", _run_script(out, cfg, train=data / "train.jsonl")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert p.poll() is None, "training process ended before its first checkpoint"
        assert time.time() - t0 < 900
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert not (out / "adapter").exists()            # killed before the end
    logged = [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) < 4
    r = subprocess.run([sys.executable, "-c", _run_script(out, cfg, train=data / "train.jsonl")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["resumed_from_step"] >= 2
    assert summ["attention"] == "packed_sdpa" and summ["config"]["fast_dropout"] and summ["config"]["fused_lora"]     # the trainer's defaults ran
    A = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    B = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert A.keys() == B.keys()
    assert max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
    # ... and training moved the weights (the comparison is not vacuous)
    assert max(A[k].abs().max().item() for k in A if "lora_B" in k) > 0


def test_nested_budget_adapter_equals_a_run_on_the_prefix(tmp_path):
    from safetensors.torch import load_file
    from imitation_nb.finetune import encode_conversations
    from imitation_nb.models import load_tokenizer
    convs = [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(3, max_chars=500))]
    append_jsonl(tmp_path / "all.jsonl", convs)
    append_jsonl(tmp_path / "prefix.jsonl", convs[:2])
    cfg = tiny_cfg(max_steps=-1, max_train_conversations=0, block_size=96, per_device_batch_size=2)
    # a budget covering exactly the first 2 conversations (by our own trained-token count)
    enc = encode_conversations(load_tokenizer(SPEC), convs)
    b = sum(e["n_trained"] for e in enc[:2]) / 1e6
    full = finetune(SPEC, tmp_path / "all.jsonl", cfg, tmp_path / "full", save_at_budgets_m=[b])
    assert full["budgets"][f"{b:g}"]["conversations"] == 2 and full["budgets"][f"{b:g}"]["saved"]
    small = finetune(SPEC, tmp_path / "prefix.jsonl", cfg, tmp_path / "small")
    assert small["steps"] == full["budgets"][f"{b:g}"]["step"] < full["steps"]
    A = load_file(str(tmp_path / "full" / "adapters" / f"{b:g}" / "adapter_model.safetensors"))
    B = load_file(str(tmp_path / "small" / "adapter" / "adapter_model.safetensors"))
    F = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
    assert max((A[k] - F[k]).abs().max().item() for k in A) > 1e-5      # the full run went further


def test_merge_matches_adapter_logits(data, tmp_path):
    from imitation_nb.models import load_model, load_tokenizer
    from transformers import AutoModelForCausalLM
    run = tmp_path / "r"
    finetune(SPEC, data / "train.jsonl", tiny_cfg(max_steps=2, block_size=64), run)
    merged = merge_adapter(SPEC, run / "adapter", tmp_path / "merged")
    tok = load_tokenizer(SPEC)
    ids = tok("Explain why the sky is blue.", return_tensors="pt").input_ids
    with torch.no_grad():
        la = load_model(SPEC, adapter=str(run / "adapter"), merge_adapter=False)(ids).logits   # the peft model
        lm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        l0 = load_model(SPEC)(ids).logits
    assert (la - lm).abs().max().item() < 1e-3
    assert (la - l0).abs().max().item() > 1e-3


def test_4bit_layers_keep_backprop_after_an_eval_forward():
    """bitsandbytes repacks a `Linear4bit` for CPU inference (AVX512-BF16 CPUs) the first time it runs in eval mode
    without gradients, after which its matmul has no autograd: a held-out evaluation before training would silently
    cut back-propagation through every frozen layer. `models.load_model` turns the repacking off."""
    import bitsandbytes as bnb
    from imitation_nb.models import load_model
    m = load_model(SPEC, quantization="nf4", for_training=True)
    lins = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert lins and not any(x.support_avx512bf16_for_cpu for x in lins)
    m.eval()
    with torch.no_grad(): m(input_ids=torch.tensor([[1, 2, 3, 4]]))          # what the held-out loss does first
    assert not any(getattr(x.weight.quant_state, "packing_format_for_cpu", False) for x in lins)
    m.train()
    lin = lins[0]
    x = torch.randn(3, lin.in_features, requires_grad=True)
    lin(x).sum().backward()                                                     # d/dx sum(x W^T) = column sums of W
    W = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    assert torch.allclose(x.grad, W.sum(0).expand_as(x.grad), atol=1e-3)


def test_a_run_shorter_than_its_warmup_still_learns(data, tmp_path):
    "One optimizer step with warmup_steps 5 (the mini NQ-synthetic case): the step must not have learning rate 0."
    with pytest.warns(UserWarning, match="warm-up cut"):
        finetune(SPEC, data / "train.jsonl", tiny_cfg(max_steps=1, warmup_steps=5, lr=1e-3), tmp_path / "run")
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in log if "learning_rate" in r]
    assert lrs and lrs[0] == pytest.approx(1e-3), lrs


def test_the_smallest_nested_budget_is_not_all_warmup(tmp_path):
    """The mini data sweep's case: warmup_steps 5 and a smallest budget saved after step 1. Without the cut that
    adapter was the base model unchanged (step 1 has learning rate 0); now it is trained and differs from zero."""
    from safetensors.torch import load_file
    from imitation_nb.finetune import encode_conversations
    from imitation_nb.models import load_tokenizer
    convs = [dict(c, order=i) for i, c in enumerate(sharegpt_wheel(4, max_chars=400))]
    append_jsonl(tmp_path / "all.jsonl", convs)
    enc = encode_conversations(load_tokenizer(SPEC), convs)
    b = enc[0]["n_trained"] / 1e6                       # the first conversation only
    cfg = tiny_cfg(max_steps=-1, max_train_conversations=0, block_size=256, warmup_steps=5, lr=1e-3)
    with pytest.warns(UserWarning, match="smallest budget"):
        out = finetune(SPEC, tmp_path / "all.jsonl", cfg, tmp_path / "run", save_at_budgets_m=[b])
    step = out["budgets"][f"{b:g}"]["step"]
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in log if "learning_rate" in r][:step]
    assert any(lr > 0 for lr in lrs), lrs
    A = load_file(str(tmp_path / "run" / "adapters" / f"{b:g}" / "adapter_model.safetensors"))
    assert max(A[k].abs().max().item() for k in A if "lora_B" in k) > 0     # LoRA B starts at zero


def test_runs_on_the_same_base_share_its_heldout_score(data, tmp_path, monkeypatch):
    """The second fine-tuning run of the same base on the same held-out answers reads the base's score from
    runs/_cache/heldout_base instead of scoring again (the mini grid's NQ-synthetic run after its data sweep): a marker
    planted in the shared file reaches the second run's heldout_base.json and its held-out table."""
    monkeypatch.setenv("IMITATION_NB_RUNS", str(tmp_path / "runs"))
    cfg = tiny_cfg(max_steps=1, heldout_max_examples=2, heldout_max_length=64)
    finetune(SPEC, data / "train.jsonl", cfg, tmp_path / "a", heldout_data=data / "heldout.jsonl")
    shared = list((tmp_path / "runs" / "_cache" / "heldout_base").glob("*.json"))
    first = json.loads((tmp_path / "a" / "heldout_base.json").read_text())
    assert len(shared) == 1 and json.loads(shared[0].read_text()) == first and 0.5 < first["loss"] < 5, first   # the real model on real answers
    shared[0].write_text(json.dumps({**first, "loss": 123.0}))
    finetune(SPEC, data / "train.jsonl", dict(cfg, max_train_conversations=10), tmp_path / "b", heldout_data=data / "heldout.jsonl")
    assert json.loads((tmp_path / "b" / "heldout_base.json").read_text())["loss"] == 123.0
    assert json.loads((tmp_path / "b" / "heldout.json").read_text())["base"]["loss"] == 123.0
