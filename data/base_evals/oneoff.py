# one-off evaluation of the two embedded bases (issue 6 done-when); resumable: rerun to continue.
# Tasks are interleaved across models (cheap ones first) so that a deadline leaves the most complete table;
# each call recomputes results.csv of a model from its cached per-item files.
import sys, time, json
from imitation_nb.eval_benchmarks import run_eval_benchmarks
SUBJ = {"smollm2-135m": {"model": "smollm2-135m", "adapter": None, "role": "base", "model_family": "SmolLM2",
                         "base_params_b": 0.135, "imitation_data": "none", "data_tokens_m": 0.0, "label": "SmolLM2-135M"},
        "gemma3-270m": {"model": "gemma3-270m", "adapter": None, "role": "base", "model_family": "Gemma-3",
                        "base_params_b": 0.268, "imitation_data": "none", "data_tokens_m": 0.0, "label": "Gemma-3-270M"}}
# HumanEval protocol: `auto` (the mini profile marks SmolLM2-135M-Instruct `instruct: true` -> chat prompt + code
# extraction; Gemma 3 270M base -> the original completion prompt); 256 new tokens; generation batch 32
SIZES = {"nq_n": 500, "mmlu_per_subject": 18, "mmlu_subjects": 0, "humaneval_n": 0, "humaneval_max_new_tokens": 256,
         "humaneval_prompt": "auto", "batch_size": 32}
PLAN = [["humaneval"], ["humaneval", "mmlu"], ["humaneval", "mmlu", "nq"]]   # never-reached tasks first (2026-12-02)
SKIP = {"smollm2-135m": {"nq"}}   # SmolLM2 NQ-open 500 was completed 2026-11-24 (results in data/base_evals/smollm2-135m)
for plan_tasks in PLAN:
    for name in sys.argv[1:]:
        tasks = [t for t in plan_tasks if t not in SKIP.get(name, set())]
        t0 = time.time()
        d = run_eval_benchmarks("mini", f"runs/base_evals/{name}", SUBJ[name], tasks, SIZES, threads=1)
        print(time.strftime("%H:%M:%S"), name, tasks, "done", round(time.time() - t0), "s", flush=True)
