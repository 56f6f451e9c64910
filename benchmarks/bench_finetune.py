"""Fine-tuning throughput: our trainer (packed blocks, assistant-only loss) vs a naive baseline (HF `Trainer`,
one conversation per row, per-batch padding, no packing), on the same ShareGPT conversations and the same model
(SmolLM2-135M-Instruct), measured in the same run. Each arm runs in its own subprocess (so its peak RSS is its
own). Reports useful tokens/s (tokens that carry a loss: non-pad assistant tokens), peak RSS for a 4-bit vs an fp32
base, and MFU against an fp32 GEMM peak measured at the start of the run.

Timed batches: each arm trains on a uniform sample of its own epoch (rows evenly spaced over the packed blocks /
the conversations: batch x (steps + 1) rows, shuffled by the Trainer), the first step untimed, so the trained
share of the timed tokens matches the epoch's (the first few blocks of the sample are far from typical).

FLOPs per step = 6 * N_trainable * T + 4 * N_frozen * T (forward 2N, backward 4N for trainable weights but only
the 2N activation-gradient half for frozen ones), T = every token position processed (padding included).

Our arm runs the trainer as the profiles configure it: packed blocks, `loss_chunk_tokens` > 0 (LM head and
loss only at positions with a target, gradient formed in the forward pass), attention per packed piece
(`packed_sdpa`), fused LoRA layers and the cheaper LoRA dropout mask, all from `train_kernels`; the naive arm is
the plain peft model (transformers' SDPA with a mask, peft's forward, torch's dropout) and uses the model's own
loss (logits at every position). `--ablate` adds an arm "ours, plain kernels" (packing and the chunked head
only) to separate the two contributions. The MFU column credits every processed position with the full model's
FLOPs, head included, so our arm (no head at untrained positions) can exceed 100 % on Gemma 3. `--spec gemma3-270m` (262k vocabulary: the head is 168M of 268M parameters)
shows the head's share; the default is SmolLM2-135M-Instruct.

usage: python benchmarks/bench_finetune.py [--spec smollm2-135m-instruct] [--n-conv 300] [--block 256] [--batch 4]
                                           [--steps 3] [--threads 2] [--loss-chunk 1024] [--ablate]
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = "smollm2-135m-instruct"
TEMPLATES = {"gemma3-270m": "gemma3-plain"}     # the base without a chat template gets the profiles' one


def gemm_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; best.append(2 * n ** 3 / (time.perf_counter() - t))
    best.sort()
    return best[len(best) // 2]          # median GFLOP/s * 1e9


def arm(kind: str, method: str, data: str, block: int, batch: int, steps: int, threads: int,
        spec: str = SPEC, loss_chunk: int = 1024, kernels: bool = True) -> dict:
    """One measured arm (runs inside a subprocess). kind: ours | naive; kernels: our attention and dropout (ours only)."""
    import resource, torch
    torch.set_num_threads(threads)
    from imitation_nb.finetune import (FinetuneConfig, BlockCollator, build_model, encode_conversations,
                                       pack_blocks, unpacked_rows, _count_params, _make_trainer_cls)
    from imitation_nb.sources import read_conversations
    from imitation_nb.models import load_tokenizer
    from transformers import Trainer, TrainingArguments, TrainerCallback, DataCollatorForSeq2Seq
    tok = load_tokenizer(spec)
    convs = read_conversations(data)
    enc = encode_conversations(tok, convs, TEMPLATES.get(spec))
    plain = kind == "naive" or not kernels      # the peft model as transformers and peft build it
    cfg = FinetuneConfig(method=method, block_size=block, per_device_batch_size=batch, lr=2e-4,
                         attention="sdpa" if plain else "auto", fast_dropout=not plain, fused_lora=not plain)
    model, _ = build_model(spec, cfg, "cpu")
    params = _count_params(model)
    if kind == "ours":
        rows = pack_blocks(enc, block, pad_id=tok.pad_token_id)
        collate, T = BlockCollator(tok.pad_token_id, True), _make_trainer_cls()
    else:   # naive: HF Trainer + padding collator, one (truncated) conversation per row, in file order
        rows = [{"input_ids": e["input_ids"][:block], "labels": e["labels"][:block]} for e in enc]
        collate, T = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), Trainer
    epoch_trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    # time a uniform sample of the arm's whole epoch, not its first batches: the share of trained tokens varies a
    # lot between conversations (3 steps from the start once gave 35 % trained positions for a 74 % epoch)
    need = batch * (steps + 1)
    if len(rows) > need:
        rows = [rows[round(i * (len(rows) - 1) / (need - 1))] for i in range(need)]
    stats = {"t": [], "useful": [], "positions": []}

    def counting(batch_rows):       # every batch the trainer draws, in order (grad_accum = 1: one per step)
        b = collate(batch_rows)
        stats["positions"].append(int(b["input_ids"].numel()))
        stats["useful"].append(int((b["labels"][:, 1:] != -100).sum()))
        return b

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
        def on_step_end(self, args, state, control, **kw): stats["t"].append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1,
                             learning_rate=2e-4, lr_scheduler_type="constant", use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, optim="adamw_torch", dataloader_num_workers=0)
    tr = T(model=model, args=args, train_dataset=rows, data_collator=counting, callbacks=[Timer()])
    if kind == "ours": tr.loss_chunk_tokens = loss_chunk
    tr.train()
    k = min(len(stats["t"]), len(stats["useful"]))
    # the first step is a warm-up and is not timed
    t = sum(stats["t"][1:k]); useful = sum(stats["useful"][1:k]); pos = sum(stats["positions"][1:k])
    flops = (6 * params["trainable"] + 4 * params["frozen"]) * pos
    return {"kind": kind, "method": method, "kernels": not plain, "attention": model.config._attn_implementation,
            "steps_timed": steps, "seconds": t, "useful_tokens": useful,
            "positions": pos, "useful_tok_s": useful / t, "flops_per_s": flops / t, "params": params,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "useful_share_of_positions": useful / pos, "step_seconds": stats["t"],
            "epoch_trained_tokens": epoch_trained, "timed_rows": len(rows)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-conv", type=int, default=300)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--loss-chunk", type=int, default=1024)
    ap.add_argument("--ablate", action="store_true", help="also time ours without train_kernels")
    ap.add_argument("--arm", default=None)            # internal: run one arm and print its JSON
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    if a.arm:
        kind, method, *plain = a.arm.split(":")
        print("RESULT " + json.dumps(arm(kind, method, a.data, a.block, a.batch, a.steps, a.threads, a.spec,
                                         a.loss_chunk, kernels=not plain)))
        return
    from imitation_nb.core import append_jsonl
    from imitation_nb.sources import sharegpt_wheel
    tmp = Path(tempfile.mkdtemp())
    convs = sharegpt_wheel(a.n_conv)
    append_jsonl(tmp / "convs.jsonl", [dict(c, order=i) for i, c in enumerate(convs)])
    peak = gemm_peak(a.threads)
    print(f"fp32 GEMM 2048^2, {a.threads} threads: {peak / 1e9:.1f} GFLOP/s (median of 5)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    res = {}
    for spec in ("naive:lora", "ours:lora", "ours:qlora") + (("ours:lora:plain",) if a.ablate else ()):
        r = subprocess.run([sys.executable, __file__, "--arm", spec, "--data", str(tmp / "convs.jsonl"),
                            "--block", str(a.block), "--batch", str(a.batch), "--steps", str(a.steps),
                            "--threads", str(a.threads), "--spec", a.spec, "--loss-chunk", str(a.loss_chunk)],
                           env=env, capture_output=True, text=True)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line: sys.exit(f"arm {spec} failed:\n{r.stderr[-3000:]}")
        res[spec] = json.loads(line[0][7:])
        x = res[spec]
        print(f"{spec:<15} useful {x['useful_tok_s']:7.1f} tok/s  positions {x['positions']:6d}  "
              f"useful {x['useful_tokens']:6d} ({x['useful_share_of_positions']:.0%})  {x['seconds']:7.1f} s  "
              f"MFU {x['flops_per_s'] / peak:6.1%}  epoch trained {x['epoch_trained_tokens']:7d}  "
              f"peak RSS {x['peak_rss_mb']:6.0f} MB", flush=True)
    n, o, q = res["naive:lora"], res["ours:lora"], res["ours:qlora"]
    print("\n| ratio | value |\n|---|---|")
    print(f"| useful tokens/s, ours (packed, LoRA) / naive HF Trainer (padded, LoRA) | {o['useful_tok_s'] / n['useful_tok_s']:.2f}x |")
    print(f"| useful tokens/s, ours QLoRA / naive HF Trainer (LoRA) | {q['useful_tok_s'] / n['useful_tok_s']:.2f}x |")
    if a.ablate:
        p = res["ours:lora:plain"]
        print(f"| useful tokens/s, ours with plain kernels (packing + chunked head only) / naive | {p['useful_tok_s'] / n['useful_tok_s']:.2f}x |")
        print(f"| useful tokens/s, ours / ours with plain kernels (packed attention, fused LoRA layers, fast dropout masks) | {o['useful_tok_s'] / p['useful_tok_s']:.2f}x |")
    print(f"| trained tokens in one epoch over the conversations, naive (each cut at the block size) / ours | "
          f"{n['epoch_trained_tokens'] / o['epoch_trained_tokens']:.2f} |")
    print(f"| peak RSS, 4-bit base / fp32 base (ours) | {q['peak_rss_mb'] / o['peak_rss_mb']:.2f} |")
    print(f"| MFU ours LoRA / QLoRA / naive | {o['flops_per_s'] / peak:.1%} / {q['flops_per_s'] / peak:.1%} / {n['flops_per_s'] / peak:.1%} |")
    print(json.dumps({"gemm_peak_gflops": peak / 1e9, "arms": res, "args": vars(a)}, default=str))


if __name__ == "__main__":
    main()
