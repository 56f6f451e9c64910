"""Two decoding-side speed-ups on Gemma 3 270M (262,144-token vocabulary), each against the path it replaced,
measured in the same run on real inputs:

(a) nucleus filtering (p = 0.9) of real next-token logits for a batch of 50 RealToxicityPrompts continuations
    (the toxicity stage's batch: 25 prompts x k = 2): transformers' `TopPLogitsWarper` (sorts every row of the
    vocabulary) vs `imitation_nb.generate.TopPWithinTopK` (top 1,024, falls back to the warper); the kept-token
    masks must be identical.
(b) MMLU 5-shot next-token scoring of N questions: the plain one-forward-per-question path vs the shared-prefix
    path (the subject's 5-shot prefix run once, config-less DynamicCache so the sliding-window layers keep it);
    the log-probabilities must agree to 1e-3 and the predicted letters exactly.

    HF_HUB_OFFLINE=1 python benchmarks/bench_decoding.py [--threads 1] [--mmlu-subjects 2] [--mmlu-per-subject 6]
"""
import argparse, time

import torch


def best_of(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = fn(); ts.append(time.perf_counter() - t)
    return min(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mmlu-subjects", type=int, default=2)
    ap.add_argument("--mmlu-per-subject", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.generation.logits_process import TopPLogitsWarper
    from imitation_nb.generate import load_lm, TopPWithinTopK, next_token_logprobs, single_token_ids
    from imitation_nb.eval_toxicity import load_rtp
    from imitation_nb.eval_benchmarks import mmlu_questions, mmlu_prompt, load_mmlu, CHOICES
    model, tok = load_lm("gemma3-270m")
    rows = []

    # (a) real logits: last position of 25 RTP prompts, each twice (k = 2)
    prompts = [p["prompt"] if isinstance(p.get("prompt"), str) else p["prompt"]["text"] for p in load_rtp(["toxic"], 25, 0)]
    enc = tok(prompts * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**enc, logits_to_keep=1).logits[:, -1].float()
    ids = enc["input_ids"]
    t_ref, ref = best_of(lambda: TopPLogitsWarper(0.9)(ids, scores.clone()))
    t_new, new = best_of(lambda: TopPWithinTopK(0.9)(ids, scores.clone()))
    same = bool((ref.isinf() == new.isinf()).all())
    rows.append(("nucleus filter, 50 x 262,144 real logits", t_ref, t_new, f"identical masks: {same}"))

    # (b) MMLU 5-shot scoring, plain vs shared prefix
    qs = mmlu_questions(a.mmlu_per_subject, a.mmlu_subjects, 0)
    dev = {s: load_mmlu(s, "dev") for s in {q["subject"] for q in qs}}
    ps = [mmlu_prompt(q, dev[q["subject"]], 5) for q in qs]
    cand = single_token_ids(tok, [" " + c for c in CHOICES])
    t_plain, plain = best_of(lambda: next_token_logprobs(model, tok, ps, cand), reps=1)
    t_shared, shared = best_of(lambda: next_token_logprobs(model, tok, ps, cand, groups=[q["subject"] for q in qs]), reps=1)
    diff = float(abs(plain - shared).max()); agree = bool((plain.argmax(1) == shared.argmax(1)).all())
    rows.append((f"MMLU 5-shot scoring, {len(qs)} questions", t_plain, t_shared,
                 f"max |dlogp| {diff:.1e}, same letters: {agree}"))

    print(f"\nGemma 3 270M, {a.threads} thread(s)\n")
    print(f"| what | baseline s | ours s | speed-up | check |\n|---|---:|---:|---:|---|")
    for what, b, o, chk in rows:
        print(f"| {what} | {b:.3f} | {o:.3f} | {b / o:.1f}x | {chk} |")
    assert same and agree and diff < 1e-3, "the fast paths must give the same results"


if __name__ == "__main__":
    main()
