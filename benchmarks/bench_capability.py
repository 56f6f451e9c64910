"""Capability tasks: imitation_nb's prefix-tree scorer (`eval_capability`) vs lm-eval-harness on the same items.

Same model (the local converted HF folder, fp32 CPU, loaded once per side before any timing), same items (the seeded subset `nested_subset(…, --n, --seed)`
of each of the 8 tasks, i.e. what `run_eval_capability` scores with `n`), same data files (`data/capability/`).
lm-eval 0.4.13 gets one local task per capability task: a YAML that `include`s lm-eval's own task YAML
(`lm_eval/tasks/arc/arc_easy.yaml`, `piqa/piqa.yaml`, `hellaswag/hellaswag.yaml`, `lambada/lambada_openai.yaml`,
`winogrande/default.yaml`, `super_glue/boolq/default.yaml`, `openbookqa/openbookqa.yaml`) and only replaces the
dataset by our file, mapped to the fields lm-eval's templates read (written here independently of our loaders):
PIQA labels from `valid-labels.lst`; HellaSwag `activity_label` / `ctx_a` split at the first ": " of the text
line and `ctx_b` = "" (lm-eval's own `process_docs` then rebuilds the query); WinoGrande as
`sentence = "_ " + continuation` with the two filled contexts as the options (lm-eval's own partial-scoring
functions then rebuild the same requests); BoolQ passage/question parsed from llm-foundry's query;
OpenBookQA as `question_stem` / lettered choices / `answerKey`. Items are selected with lm-eval's `samples=`.

Printed per task: accuracy (each metric) on both sides, request strings that differ, predictions that differ
(acc and acc_norm argmax; LAMBADA: the greedy flag), max |Δ log-likelihood|, and wall seconds (model loading not
timed on either side: lm-eval gets a pre-built `HFLM`; its task/dataset setup and our data loading are timed).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_capability.py [--n 200] [--threads 1]
    (needs `pip install lm-eval==0.4.13`)
"""
import argparse, json, os, tempfile, time
from pathlib import Path

import numpy as np
import torch

UTILS = r'''
import bz2, json, re
import datasets

DATA = {data!r}

def piqa_labels(dataset):
    labels = [int(l) for l in open(DATA + "/piqa/valid-labels.lst", encoding="utf-8").read().split()]
    return dataset.add_column("label", labels)

def hellaswag_dataset(**kwargs):
    lines = bz2.open(DATA + "/hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")[:-1]
    docs = []
    for k in range(0, len(lines), 6):
        label, ctx = lines[k].split(": ", 1)
        docs.append({{"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[k + 2:k + 6], "label": lines[k + 1]}})
    return datasets.DatasetDict({{"validation": datasets.Dataset.from_list(docs)}})

def winogrande_docs(dataset):
    return dataset.map(lambda d: {{"sentence": "_ " + d["continuation"], "option1": d["context_options"][0],
                                   "option2": d["context_options"][1], "answer": str(d["gold"] + 1)}})

def boolq_docs(dataset):
    def f(d):
        m = re.fullmatch(r"Passage: (.*)\nQuestion: (.*)\?", d["query"], re.S)
        return {{"passage": m.group(1), "question": m.group(2), "label": d["gold"]}}
    return dataset.map(f)

def openbookqa_docs(dataset):
    return dataset.map(lambda d: {{"question_stem": d["query"], "choices": {{"text": d["choices"], "label": ["A", "B", "C", "D"]}},
                                   "answerKey": "ABCD"[d["gold"]]}})
'''

# task -> (lm-eval's YAML, relative to lm_eval/tasks; our data file; split name; extra YAML lines)
LME = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy/ARC-Easy-test.jsonl", "test", ""),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge/ARC-Challenge-test.jsonl", "test", ""),
    "piqa": ("piqa/piqa.yaml", "piqa/valid.jsonl", "validation", "process_docs: !function utils.piqa_labels\n"),
    "hellaswag": ("hellaswag/hellaswag.yaml", None, "validation", "custom_dataset: !function utils.hellaswag_dataset\n"),
    "lambada": ("lambada/lambada_openai.yaml", "lambada/lambada_test.jsonl", "test", ""),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande.jsonl", "validation", "process_docs: !function utils.winogrande_docs\n"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/boolq.jsonl", "validation", "process_docs: !function utils.boolq_docs\n"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/openbook_qa.jsonl", "test", "process_docs: !function utils.openbookqa_docs\n"),
}


def task_yaml(task: str, data: Path, lm_eval_tasks: Path) -> str:
    inc, f, split, extra = LME[task]
    y = f"include: {lm_eval_tasks / inc}\ntask: imnb_{task}\ntag: [imnb_capability]\n"
    if f is not None:
        y += f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    {split}: {data / f}\n"
    y += f"test_split: {split}\nvalidation_split: null\ntraining_split: null\nfewshot_split: null\n" if split == "test" else \
         f"validation_split: {split}\ntest_split: null\ntraining_split: null\nfewshot_split: null\n"
    return y + extra


def lme_pred(lls, choices):
    "lm-eval's argmax predictions from its own log-likelihoods (np.argmax over lls and lls / len(choice))."
    lls = np.array(lls)
    return int(np.argmax(lls)), int(np.argmax(lls / np.array([float(len(c)) for c in choices])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200, help="items per task (the seeded subset run_eval_capability scores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-eval-batch-size", default="8")
    ap.add_argument("--save", default=None, help="write both sides' per-item results to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from imitation_nb.eval_capability import (CAPABILITY_TASKS, TASK_INFO, EvalCapabilityConfig, capability_dir, load_task,
                                              nested_subset, encode_item, score_requests, item_record)
    from imitation_nb.generate import load_lm
    from imitation_nb.models import prepare_model
    tasks = list(CAPABILITY_TASKS) if a.tasks == "all" else a.tasks.split(",")
    cfg = EvalCapabilityConfig()

    # ---- both models loaded first (not timed); then per task: ours, then lm-eval, back to back (machine-load drift hits both)
    import lm_eval, datasets
    from lm_eval.tasks import TaskManager
    from lm_eval.models.huggingface import HFLM
    model, tok = load_lm(a.model)
    lm = HFLM(pretrained=str(prepare_model(a.model)), dtype="float32", device="cpu", batch_size=a.lm_eval_batch_size)
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    ours, t_ours, items, lme, t_lme = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        os.environ["HF_DATASETS_CACHE"] = str(Path(d) / "hf_datasets")          # leave the user's cache alone
        datasets.config.HF_DATASETS_CACHE = Path(d) / "hf_datasets"
        Path(d, "utils.py").write_text(UTILS.format(data=str(capability_dir())))
        for t in tasks: Path(d, f"imnb_{t}.yaml").write_text(task_yaml(t, capability_dir(), lm_eval_tasks))
        tm = TaskManager(include_path=d)
        for t in tasks:
            t0 = time.perf_counter()
            full = load_task(t)
            sub = nested_subset(full, a.n, a.seed, t)
            res = score_requests(model, [encode_item(tok, it) for it in sub], cfg.max_batch_tokens, cfg.max_batch_items,
                                 cfg.max_scored_positions)
            ours[t] = [item_record(it, r) for it, r in zip(sub, res)]
            t_ours[t] = time.perf_counter() - t0
            index = {it["id"]: k for k, it in enumerate(full)}
            items[t] = [(index[it["id"]], it) for it in sub]
            print(f"ours {t}: {len(ours[t])} items, {t_ours[t]:.1f} s", flush=True)
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[f"imnb_{t}"], task_manager=tm,
                                          samples={f"imnb_{t}": [k for k, _ in items[t]]},
                                          batch_size=a.lm_eval_batch_size, log_samples=True, random_seed=0,
                                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
            t_lme[t] = time.perf_counter() - t0
            lme[t] = {s["doc_id"]: s for s in res["samples"][f"imnb_{t}"]}
            print(f"lm-eval {t}: {len(lme[t])} items, {t_lme[t]:.1f} s", flush=True)

    # ---- compare
    print(f"\nbench_capability: {a.model}, {a.n} items per task (seed {a.seed}), 0-shot, torch threads={a.threads}, "
          f"lm-eval {getattr(lm_eval, '__version__', '')} hf batch {a.lm_eval_batch_size}")
    print("| task | n | metric | lm-eval | ours | differing requests | differing predictions | max abs d-loglik | lm-eval s | ours s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tot = {"req": 0, "pred": 0, "n": 0, "lme": 0.0, "ours": 0.0}
    saved = {}
    for t in tasks:
        info = TASK_INFO[t]
        req_diff = pred_diff = 0; dll = 0.0
        acc = {m: [0, 0] for m in info["metrics"] if m != "perplexity"}
        lme_ll, our_ll = [], []
        for (k, it), r in zip(items[t], ours[t]):
            s = lme[t][k]
            args = [list(x) for x in s["arguments"]]
            req_diff += sum(list(x[:2]) != y for x, y in zip(args, it["requests"])) + abs(len(args) - len(it["requests"]))
            lls = [x[0] for x in s["filtered_resps"]]; greedy = [bool(x[1]) for x in s["filtered_resps"]]
            dll = max(dll, max(abs(x - y) for x, y in zip(lls, r["ll"])))
            if t == "lambada":
                pred_diff += int(greedy[0] != r["greedy"][0])
                lme_ll.append(lls[0]); our_ll.append(r["ll"][0])
            else:
                p, pn = lme_pred(lls, it["choices"])
                pred_diff += int(p != r["pred"]) + int("acc_norm" in acc and pn != r["pred_norm"])
            for m in acc: acc[m][0] += s[m]; acc[m][1] += r[m]
        n = len(items[t])
        tot["req"] += req_diff; tot["pred"] += pred_diff; tot["n"] += n; tot["lme"] += t_lme[t]; tot["ours"] += t_ours[t]
        cells = []
        for m in info["metrics"]:
            if m == "perplexity":
                cells.append((m, f"{np.exp(-np.mean(lme_ll)):.2f}", f"{np.exp(-np.mean(our_ll)):.2f}"))
            else:
                cells.append((m + (" (headline)" if m == info["headline"] else ""), f"{100 * acc[m][0] / n:.1f}%", f"{100 * acc[m][1] / n:.1f}%"))
        for j, (m, x, y) in enumerate(cells):
            tail = (f"{req_diff} | {pred_diff} | {dll:.1e} | {t_lme[t]:.1f} | {t_ours[t]:.1f} | **{t_lme[t] / t_ours[t]:.2f}x** |"
                    if j == 0 else "| | | | | |")
            print(f"| {t if j == 0 else ''} | {n if j == 0 else ''} | {m} | {x} | {y} | {tail}")
        saved[t] = {"lm_eval_s": t_lme[t], "ours_s": t_ours[t], "ours": ours[t],
                    "lm_eval": [{"doc_id": k, "ll": [x[0] for x in lme[t][k]["filtered_resps"]],
                                 **{m: lme[t][k][m] for m in acc}} for k, _ in items[t]]}
    print(f"| all | {tot['n']} | | | | {tot['req']} | {tot['pred']} | | {tot['lme']:.1f} | {tot['ours']:.1f} | **{tot['lme'] / tot['ours']:.2f}x** |")
    print(f"\nrequest strings identical: {tot['req'] == 0}; predictions differing: {tot['pred']} (target 0)")
    if a.save: Path(a.save).write_text(json.dumps({"args": vars(a), "tasks": saved}))


if __name__ == "__main__":
    main()
