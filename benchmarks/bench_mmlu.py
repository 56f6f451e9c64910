"""MMLU scoring: imitation_nb's one-forward-per-question scorer vs lm-eval-harness on the same questions.

Same model (SmolLM2-135M-Instruct, the local converted HF folder, fp32 CPU), same questions (the first
`--per-subject` test questions of the first `--subjects` subjects, alphabetically: 50 x 4 = 200 by default),
same CSVs (`data/mmlu/{dev,test}/`) and the same Hendrycks 5-shot prompt: lm-eval gets one local task per
subject (generated YAML: `dataset_path: csv` on our files, `description` = the Hendrycks header, the 5 dev
examples in file order via `fewshot_config.sampler: first_n`, `doc_to_choice: [A, B, C, D]`, target
delimiter " "), i.e. lm-eval's standard MMLU formulation scored by loglikelihood of " A".." D".
Model loading is not timed on either side (lm-eval gets a pre-built `HFLM`); its task/dataset setup is.
Prints accuracy of both, the number of questions on which the predictions differ, and the wall-time ratio.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_mmlu.py [--subjects 50] [--per-subject 4]
    (needs `pip install lm-eval==0.4.13`)
"""
import argparse, os, tempfile, time
from pathlib import Path

import torch


def task_yaml(subject: str, mmlu_dir: Path) -> str:
    from imitation_nb.eval_benchmarks import format_subject
    test, dev = mmlu_dir / "test" / f"{subject}_test.csv", mmlu_dir / "dev" / f"{subject}_dev.csv"
    return f"""task: imnb_mmlu_{subject}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 5
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {format_subject(subject)}.\\n\\n"
doc_to_text: "{{{{question}}}}\\nA. {{{{choice0}}}}\\nB. {{{{choice1}}}}\\nC. {{{{choice2}}}}\\nD. {{{{choice3}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--subjects", type=int, default=50)
    ap.add_argument("--per-subject", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-eval-batch-size", default="8")
    ap.add_argument("--no-shared-prefix", action="store_true", help="score without reusing the 5-shot prefix KV cache")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from imitation_nb.core import data_dir
    from imitation_nb.models import prepare_model
    from imitation_nb.generate import load_lm, next_token_logprobs, single_token_ids
    from imitation_nb.eval_benchmarks import mmlu_subjects, load_mmlu, mmlu_prompt, mmlu_letter_scores
    subjects = mmlu_subjects()[:a.subjects]
    qs = [q for s in subjects for q in load_mmlu(s)[:a.per_subject]]
    n = len(qs)

    # ---- ours: one forward pass per question, batched (model loading not timed, as for lm-eval)
    model, tok = load_lm(a.model)
    t0 = time.perf_counter()
    dev = {s: load_mmlu(s, "dev") for s in subjects}
    prompts = [mmlu_prompt(q, dev[q["subject"]], 5) for q in qs]
    lp = next_token_logprobs(model, tok, prompts, single_token_ids(tok, [" A", " B", " C", " D"]),
                             groups=None if a.no_shared_prefix else [q["subject"] for q in qs])
    ours = mmlu_letter_scores(lp)
    t_ours = time.perf_counter() - t0
    acc_ours = sum(p == q["answer"] for p, q in zip(ours, qs)) / n
    del model

    # ---- lm-eval-harness, hf model type on the same local folder
    import lm_eval
    from lm_eval.tasks import TaskManager
    path = str(prepare_model(a.model))
    with tempfile.TemporaryDirectory() as d:
        for s in subjects: Path(d, f"imnb_mmlu_{s}.yaml").write_text(task_yaml(s, data_dir() / "mmlu"))
        tm = TaskManager(include_path=d)
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=a.lm_eval_batch_size)  # loading not timed
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm,
                                      tasks=[f"imnb_mmlu_{s}" for s in subjects], task_manager=tm,
                                      limit=a.per_subject, batch_size=a.lm_eval_batch_size, log_samples=True,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        t_lme = time.perf_counter() - t0
    preds_lme = {}
    for s in subjects:
        for smp in res["samples"][f"imnb_mmlu_{s}"]:
            ll = [r[0] for r in smp["filtered_resps"]]
            preds_lme[(s, smp["doc_id"])] = max(range(4), key=lambda k: ll[k])
    lme = [preds_lme[(q["subject"], int(q["id"].rsplit("-", 1)[1]))] for q in qs]
    acc_lme = sum(p == q["answer"] for p, q in zip(lme, qs)) / n
    # the first prompt as lm-eval built it, for a format check
    first = res["samples"][f"imnb_mmlu_{subjects[0]}"][0]["arguments"][0][0]
    same_prompt = first == prompts[0]
    diff = sum(x != y for x, y in zip(ours, lme))

    print(f"\nbench_mmlu: {a.model}, {n} questions ({len(subjects)} subjects x {a.per_subject}), 5-shot, torch threads={a.threads}")
    print("| method | accuracy | wall s | questions/s |")
    print("|---|---|---|---|")
    print(f"| lm-eval-harness {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''} (hf, batch {a.lm_eval_batch_size}) | {100 * acc_lme:.1f}% | {t_lme:.1f} | {n / t_lme:.2f} |")
    print(f"| imitation_nb one-forward | {100 * acc_ours:.1f}% | {t_ours:.1f} | {n / t_ours:.2f} |")
    print(f"\nspeed-up: {t_lme / t_ours:.2f}x (target >= 3x); accuracy difference: "
          f"{abs(acc_ours - acc_lme) * n:.0f} question(s) of {n} (target <= {n / 100:.0f}); "
          f"predictions differing: {diff}; identical prompt text: {same_prompt}")


if __name__ == "__main__":
    main()
