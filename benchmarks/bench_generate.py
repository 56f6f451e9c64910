"""Batched generation (imitation_nb.generate) vs per-example HF `generate` on the same NQ-open prompts.

Both sides: SmolLM2-135M-Instruct (embedded), fp32, greedy, the same 3-shot NQ prompts, the same
max_new_tokens and stop string. The baseline is the naive loop: one `model.generate` call per prompt.
Prints a table of throughputs and their ratio, measured in one run; checks that outputs agree.

    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py [--n 64] [--max-new-tokens 24] [--batch-size 16] [--threads 1]
"""
import argparse, random, time

import torch

from imitation_nb.generate import Generator, cut_at_stop
from imitation_nb.eval_benchmarks import load_nq, qa_prompt, seeded_subset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    qs = seeded_subset(load_nq("dev"), a.n, 0)
    ex = random.Random(0).sample(load_nq("efficientqa-dev"), 3)
    items = [{"id": q["id"], "prompt": qa_prompt(q["question"], ex)} for q in qs]
    gen = Generator(a.model)
    tok, model = gen.tok, gen.model
    gen.generate(items[:2], max_new_tokens=4, progress=False)          # warm-up (both sides share it)

    # baseline: per-example HF generate
    t0 = time.perf_counter(); base_out, base_tokens = [], 0
    for it in items:
        enc = tok(it["prompt"], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                               top_k=None, pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
        new = g[0, enc.input_ids.shape[1]:]
        base_tokens += len(new)
        base_out.append(cut_at_stop(tok.decode(new, skip_special_tokens=True), ["\n"])[0])
    t_base = time.perf_counter() - t0

    # ours: batched, length-sorted, left padding
    t0 = time.perf_counter()
    recs = gen.generate(items, max_new_tokens=a.max_new_tokens, stop=["\n"], batch_size=a.batch_size, progress=False)
    t_ours = time.perf_counter() - t0
    ours_tokens = sum(r["n_new_tokens"] for r in recs)
    agree = sum(r["output"].strip() == b.strip() for r, b in zip(recs, base_out))

    print(f"\nbench_generate: {a.model}, {a.n} NQ-open 3-shot prompts, greedy, max_new_tokens={a.max_new_tokens}, "
          f"stop='\\n', torch threads={a.threads}")
    print(f"| method | wall s | prompts/s | new tokens | new tok/s |")
    print(f"|---|---|---|---|---|")
    print(f"| per-example HF generate | {t_base:.1f} | {a.n / t_base:.2f} | {base_tokens} | {base_tokens / t_base:.1f} |")
    print(f"| imitation_nb.generate (batch {a.batch_size}) | {t_ours:.1f} | {a.n / t_ours:.2f} | {ours_tokens} | {ours_tokens / t_ours:.1f} |")
    print(f"\nspeed-up (prompts/s ratio): {t_base / t_ours:.2f}x   (target >= 4x)")
    print(f"identical answers: {agree}/{a.n}")


if __name__ == "__main__":
    main()
