"""The training kernels of `train_kernels` and the chunked LM head of `finetune` against what transformers, peft and
torch do, measured in the same run.

Attention (forward + backward, random queries/keys/values, real piece layouts): the position ids of real packed
blocks (300 ShareGPT conversations, SmolLM2 tokenizer, 512- and 2048-token blocks, the first 4 blocks), the head
shapes of SmolLM2-135M (9 query / 3 key-value heads of 64) and Gemma 3 270M (4 / 1 of 256, sliding window 512).
Baseline: transformers' SDPA function with the mask transformers builds for those position ids
(`create_causal_mask` / `create_sliding_window_causal_mask`); ours: `packed_sdpa_attention`. Outputs compared.

Dropout (p = 0.05 on a 2048 x 576 input, the LoRA input of a 512 x 4 SmolLM2 batch): torch's `nn.Dropout` vs
`FastDropout`: mask only, forward, forward + backward. Median of repeated calls.

LoRA layer (forward + backward, 2048 tokens, r = 16, alpha = 32, dropout 0.05, frozen fp32 base; SmolLM2's
576 -> 1536 and 576 -> 576 projections): peft's forward with torch's dropout, peft's forward with `FastDropout`,
`use_fused_lora`.

LM head + cross-entropy (forward + backward at the 1,570 positions with a target of a 512 x 4 SmolLM2 batch,
vocabulary 49,152): the logits of every target position at once and `F.cross_entropy` through autograd (the
model's own loss, restricted to those positions) vs `finetune._lm_loss_chunked`'s fused head (chunks of 1024,
gradient formed in the forward pass, buffers reused).

usage: python benchmarks/bench_train_kernels.py [--threads 1] [--reps 5]
"""
import argparse, os, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_ms(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from imitation_nb.finetune import encode_conversations, pack_blocks, BlockCollator
    from imitation_nb.sources import sharegpt_wheel
    from imitation_nb.models import load_tokenizer
    from imitation_nb.train_kernels import (packed_sdpa_attention, packed_pieces, bernoulli_keep,
                                            fast_dropout_class, use_fast_dropout, use_fused_lora)
    tok = load_tokenizer("smollm2-135m-instruct")
    enc = encode_conversations(tok, sharegpt_wheel(300))
    rows = []
    print("| attention, forward + backward | block | pieces | transformers SDPA + mask ms | packed_sdpa ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for block in (512, 2048):
        pos = BlockCollator(tok.pad_token_id)(pack_blocks(enc, block, pad_id=tok.pad_token_id)[:4])["position_ids"]
        n_pieces = sum(len(p) for p in packed_pieces(pos))
        for name, H, Hk, D, window in (("SmolLM2 (9/3 x 64)", 9, 3, 64, None), ("Gemma 3 (4/1 x 256, window 512)", 4, 1, 256, 512)):
            cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hk, head_dim=D,
                              num_hidden_layers=1, intermediate_size=8, vocab_size=8)
            cfg._attn_implementation = "sdpa"
            if window: cfg.sliding_window = window
            emb = torch.zeros(pos.shape[0], block, 1)
            make = create_sliding_window_causal_mask if window else create_causal_mask
            mask = make(config=cfg, inputs_embeds=emb, attention_mask=None, past_key_values=None, position_ids=pos)

            class Layer:
                is_causal, num_key_value_groups, sliding_window = True, H // Hk, window
            torch.manual_seed(0)
            q = torch.randn(pos.shape[0], H, block, D, requires_grad=True)
            k, v = (torch.randn(pos.shape[0], Hk, block, D, requires_grad=True) for _ in range(2))
            kw = dict(scaling=D ** -0.5, position_ids=pos, sliding_window=window)

            def run(fn, m):
                out, _ = fn(Layer(), q, k, v, m, **kw)
                out.backward(torch.ones_like(out))
                return out.detach()
            diff = (run(sdpa_attention_forward, mask) - run(packed_sdpa_attention, None)).abs().max().item()
            t0 = median_ms(lambda: run(sdpa_attention_forward, mask), a.reps)
            t1 = median_ms(lambda: run(packed_sdpa_attention, None), a.reps)
            print(f"| {name} | {block} x 4 | {n_pieces} | {t0:.0f} | {t1:.0f} | {t0 / t1:.2f}x | {diff:.1e} |", flush=True)

    x = torch.randn(2048, 576, requires_grad=True)
    torch_drop, fast_drop = torch.nn.Dropout(0.05), fast_dropout_class()(0.05)

    def fb(d):
        y = d(x); y.backward(torch.ones_like(y))
    pairs = [("mask only", lambda: torch.empty(2048, 576, dtype=torch.bool).bernoulli_(0.95),
              lambda: bernoulli_keep((2048, 576), 0.05)),
             ("forward", lambda: torch_drop(x), lambda: fast_drop(x)),
             ("forward + backward", lambda: fb(torch_drop), lambda: fb(fast_drop))]
    print("\n| dropout p = 0.05, 2048 x 576 | torch ms | FastDropout ms | ratio |\n|---|---|---|---|")
    for name, f0, f1 in pairs:
        t0, t1 = median_ms(f0, 3 * a.reps), median_ms(f1, 3 * a.reps)
        print(f"| {name} | {t0:.2f} | {t1:.2f} | {t0 / t1:.2f}x |", flush=True)

    from peft import LoraConfig, get_peft_model
    print("\n| LoRA layer, forward + backward, 2048 tokens | peft + torch dropout ms | peft + FastDropout ms | fused ms "
          "| ratio fused / peft + torch dropout | max abs diff of x.grad (dropout off) |\n|---|---|---|---|---|---|")
    for d_in, d_out in ((576, 1536), (576, 576)):
        def layer(kind, p=0.05):
            torch.manual_seed(0)
            net = torch.nn.Module(); net.proj = torch.nn.Linear(d_in, d_out, bias=False)
            pm = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=["proj"],
                                                init_lora_weights=False))
            if kind != "peft": use_fast_dropout(pm)
            if kind == "fused": use_fused_lora(pm)
            return pm.base_model.model.proj.train()
        xin = torch.randn(4, 512, d_in, requires_grad=True)
        w_out = torch.randn(4, 512, d_out)

        def fwd_bwd(mod):
            xin.grad = None
            (mod(xin) * w_out).sum().backward()
            return xin.grad
        diff = (fwd_bwd(layer("peft", 0.0)) - fwd_bwd(layer("fused", 0.0))).abs().max().item()
        ts = [median_ms(lambda m=layer(k): fwd_bwd(m), 3 * a.reps) for k in ("peft", "fast", "fused")]
        print(f"| {d_in} -> {d_out} | {ts[0]:.2f} | {ts[1]:.2f} | {ts[2]:.2f} | {ts[0] / ts[2]:.2f}x | {diff:.1e} |", flush=True)

    import torch.nn.functional as F
    from imitation_nb.finetune import _fused_head_ce
    torch.manual_seed(0)
    W = torch.randn(49152, 576) * 0.05
    h = torch.randn(1570, 576, requires_grad=True)
    tgt = torch.randint(0, 49152, (1570,))
    bufs = {}

    def plain_head():
        h.grad = None
        loss = F.cross_entropy(h @ W.T, tgt, reduction="sum"); loss.backward()
        return loss.detach(), h.grad

    def fused_head():
        h.grad = None
        loss = _fused_head_ce().apply(h, W, tgt, 1024, None, bufs); loss.backward()
        return loss.detach(), h.grad
    (l0, g0), (l1, g1) = plain_head(), fused_head()
    t0, t1 = median_ms(plain_head, a.reps), median_ms(fused_head, a.reps)
    print("\n| LM head + cross-entropy, 1570 x 49152, forward + backward | autograd ms | fused ms | ratio | loss rel. diff | max abs diff of grad |\n|---|---|---|---|---|---|")
    print(f"| SmolLM2 head | {t0:.0f} | {t1:.0f} | {t0 / t1:.2f}x | {abs(l0 - l1).item() / abs(l0).item():.1e} | {(g0 - g1).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
