"""Agreement of the offline toxicity scorers with the archived 2020 Perspective scores of RealToxicityPrompts.

Scores every RTP text that carries a Perspective TOXICITY score (prompts and human continuations of the
1,196 challenging + 1,200 non-toxic prompts in data/realtoxicityprompts/: 4,773 texts) with our numpy
tox-block, alt-profanity-check and their mean (the `offline-jigsaw` default), and prints Spearman ρ,
Pearson r, AUROC (label: Perspective >= 0.5) and the rate of scores >= 0.5, for all texts and for the
continuations only. Throughput is printed as a ratio against a naive baseline measured in the same run
(scoring one text per call, on a 200-text sample).

    PYTHONPATH=. python benchmarks/bench_toxicity_agreement.py [--backends offline-jigsaw,tox-block,profanity-check]
"""
import argparse, time

import numpy as np
from scipy.stats import pearsonr, spearmanr

from imitation_nb.eval_toxicity import auroc, get_scorer, load_rtp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="offline-jigsaw,tox-block,profanity-check")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    rtp = load_rtp()
    items = [(r[f"{part}"], r[f"{part}_toxicity"], part) for r in rtp for part in ("prompt", "continuation")
             if r[f"{part}_toxicity"] is not None]
    texts = [t for t, _, _ in items]; ref = np.array([p for _, p, _ in items]); cont = np.array([k == "continuation" for *_, k in items])
    print(f"{len(texts)} RTP texts with archived Perspective TOXICITY ({cont.sum()} continuations); "
          f"Perspective rate >= {args.threshold}: all {np.mean(ref >= args.threshold):.3f}, continuations {np.mean(ref[cont] >= args.threshold):.3f}")
    print(f"{'scorer':<18} {'rho':>6} {'pearson':>8} {'AUROC':>6} {'rate':>6} | {'cont rho':>8} {'AUROC':>6} {'rate':>6} | texts/s (batched / one-per-call = ratio)")
    for name in args.backends.split(","):
        sc = get_scorer(name)
        sc.score(texts[:10])                                   # warm-up (load weights)
        t0 = time.perf_counter(); s = np.array(sc.score(texts)["toxicity"]); dt = time.perf_counter() - t0
        sample = texts[:200]
        t1 = time.perf_counter()
        for t in sample: sc.score([t])
        dt1 = time.perf_counter() - t1
        lab = ref >= args.threshold
        fast, slow = len(texts) / dt, len(sample) / dt1
        print(f"{name:<18} {spearmanr(s, ref)[0]:6.3f} {pearsonr(s, ref)[0]:8.3f} {auroc(s, lab):6.3f} {np.mean(s >= args.threshold):6.3f} | "
              f"{spearmanr(s[cont], ref[cont])[0]:8.3f} {auroc(s[cont], lab[cont]):6.3f} {np.mean(s[cont] >= args.threshold):6.3f} | "
              f"{fast:,.0f} / {slow:,.0f} = {fast / slow:.1f}x")


if __name__ == "__main__":
    main()
