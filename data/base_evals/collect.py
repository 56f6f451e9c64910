# collect the one-off base evaluation into data/base_evals/ (small files only)
import json, shutil, sys
from pathlib import Path
from imitation_nb.core import read_jsonl, append_results, read_manifest
from imitation_nb.eval_benchmarks import load_nq, seeded_subset, first_line, exact_match, qa_rows, load_humaneval
from oneoff import SUBJ, SIZES
root = Path(__file__).resolve().parents[2]; out = root / "data" / "base_evals"; out.mkdir(parents=True, exist_ok=True)
# status of a model whose run directory is not on this machine is kept as committed
status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
for name, subj in SUBJ.items():
    d = root / "runs" / "base_evals" / name
    if not d.exists(): status.setdefault(name, "not started"); continue
    od = out / name; od.mkdir(exist_ok=True)
    # merge, never overwrite: a task measured in an earlier run directory (e.g. SmolLM2's NQ-open 500 of
    # 2026-11-24) keeps its committed rows and summary entry unless this run measured it again
    import pandas as pd
    old_res = pd.read_csv(od / "results.csv") if (od / "results.csv").exists() else None
    old_sum = json.loads((od / "summary.json").read_text()) if (od / "summary.json").exists() else {}
    for f in ("manifest.json", "summary.json", "results.csv"):
        if (d / f).exists(): shutil.copy(d / f, od / f)
    if old_res is not None and (od / "results.csv").exists():
        new_res = pd.read_csv(od / "results.csv")
        keep = old_res[~old_res.metric_key.isin(set(new_res.metric_key))]
        pd.concat([keep, new_res], ignore_index=True).to_csv(od / "results.csv", index=False)
    if old_sum and (od / "summary.json").exists():
        new_sum = json.loads((od / "summary.json").read_text())
        merged = {**{k: v for k, v in old_sum.items() if k != "wall_s"}, **{k: v for k, v in new_sum.items() if k != "wall_s"}}
        merged["wall_s"] = {**old_sum.get("wall_s", {}), **new_sum.get("wall_s", {})}
        (od / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
    st = {"finished_tasks": list(json.loads((d / "summary.json").read_text()).get("wall_s", {})) if (d / "summary.json").exists() else []}
    gens = {r["id"]: r for r in read_jsonl(d / "nq_generations.jsonl")}
    if gens and "nq" not in st["finished_tasks"]:
        qs = [q for q in seeded_subset(load_nq("dev"), SIZES["nq_n"], 0) if q["id"] in gens]
        k = sum(exact_match(first_line(gens[q["id"]]["output"]), q["answers"]) for q in qs)
        rows = qa_rows("nq_em_3shot", k, len(qs), subj, f"PARTIAL (deadline): {len(qs)} of the {SIZES['nq_n']} sampled "
                       "questions, those generated first = the longest prompts; 3-shot, greedy")
        for r in rows: r.update(run_id=f"mini/eval_benchmarks/base_evals-{name}-partial", profile="mini", seed=0, stage="eval_benchmarks")
        (od / "partial_results.csv").unlink(missing_ok=True)
        append_results(rows, od / "partial_results.csv")
        st["nq_partial"] = {"n": len(qs), "correct": k, "em": 100 * k / len(qs)}
    for f in ("humaneval_exec.jsonl", "mmlu_scores.jsonl"):
        st[f] = len(read_jsonl(d / f)) if (d / f).exists() else 0
    st["nq_generated"] = len(gens)
    status[name] = st
(out / "status.json").write_text(json.dumps(status, indent=1) + "\n")
print(json.dumps(status, indent=1))
