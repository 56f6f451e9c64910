"""Notebook-first, reproducible companion to 'The False Promise of Imitating Proprietary LLMs' (Gudibande et al., 2023)

Modules:

- `imitation_nb.eval_human`: Study builder, MTurk export/import, a local rating page (SQLite), and the aggregation behind the paper's crowdworker numbers.
- `imitation_nb.nq_synthetic`: Query the teacher with 5 random seed QA pairs per call, parse the `Q:`/`A:` lines it returns, deduplicate, decontaminate against the NQ evaluation questions, and write `nq_synthetic.jsonl`.
- `imitation_nb.serve`: `imitation-nb serve MODEL [--adapter PATH] [--port 8800]`: chat completions from an embedded or hub model (optionally with a fine-tuned LoRA adapter) on loopback — the offline teacher and judge.
- `imitation_nb.teacher`: Every call to a teacher (ChatGPT in the paper) or a judge (GPT-4) goes through this client: any OpenAI-compatible server, bounded concurrency, retries, a hard budget and a SQLite request cache."""

__version__ = "0.1.0"
