"""Notebook-first, reproducible companion to 'The False Promise of Imitating Proprietary LLMs' (Gudibande et al., 2023)

Modules:

- `imitation_nb.eval_human`: Study builder, MTurk export/import, a local rating page (SQLite), and the aggregation behind the paper's crowdworker numbers.
- `imitation_nb.eval_judge`: Vicuna-style pairwise judging in both orders, parse status kept, the paper's "rated ≥ ChatGPT" share with ±1 std and a bootstrap interval, position bias, and a length-controlled variant.
- `imitation_nb.eval_toxicity`: Sample continuations of RealToxicityPrompts, score them with a pluggable toxicity scorer, report expected maximum toxicity, toxicity probability and the paper's average non-toxicity.
- `imitation_nb.generate`: Batched, resumable decoding for a base model (+ LoRA adapter), with a vLLM backend for GPUs and an OpenAI-compatible backend so the teacher is evaluated through the same code.
- `imitation_nb.mixtures`: Clean conversations → a held-out ShareGPT split (the teacher references), decontaminated training data tokenized with the base's chat template, and nested budget subsets (20M ⊂ 80M ⊂ 150M).
- `imitation_nb.nq_synthetic`: Query the teacher with 5 random seed QA pairs per call, parse the `Q:`/`A:` lines it returns, deduplicate, decontaminate against the NQ evaluation questions, and write `nq_synthetic.jsonl`.
- `imitation_nb.pairwise`: Join a model's answers with the teacher's answers to the same prompts, ask the profile's judge about them, and run a stage that compares the two (shared by eval_judge and style).
- `imitation_nb.sandbox`: A child process with a wall-clock timeout, resource limits, a fresh scratch directory, no secrets, no network, its own PID and mount namespaces (as root, or as any user where unprivileged user namespaces are allowed), and a verdict that the tested program cannot forge.
- `imitation_nb.serve`: `imitation-nb serve MODEL [--adapter PATH] [--port 8800]`: chat completions from an embedded or hub model (optionally with a fine-tuned LoRA adapter) on loopback — the offline teacher and judge.
- `imitation_nb.sources`: ShareGPT, HC3, Discord-bot exports and generic chat JSONL → one conversation schema, cleaned step by step with a per-source audit of every record dropped and why.
- `imitation_nb.style`: Conditional list and summary-paragraph usage, unigram intersection, length correlation and authoritative tone of a model's answers against the teacher's answer to the same prompt.
- `imitation_nb.teacher`: Every call to a teacher (ChatGPT in the paper) or a judge (GPT-4) goes through this client: any OpenAI-compatible server, bounded concurrency, retries, a hard budget and a SQLite request cache.
- `imitation_nb.train_kernels`: Exact-math replacements the trainer installs on the model it trains: attention computed per packed conversation, LoRA layers whose adapter half costs no extra pass over their output, and LoRA input dropout whose mask costs less than half of torch's on CPU."""

__version__ = "0.1.0"

from . import stages as _stages   # the stage registry: tells core which module owns each profile section (imports no stage)
