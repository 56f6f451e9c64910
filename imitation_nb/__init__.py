"""Notebook-first, reproducible companion to 'The False Promise of Imitating Proprietary LLMs' (Gudibande et al., 2023)

Modules:

- `imitation_nb.eval_human`: Study builder, MTurk export/import, a local rating page (SQLite), and the aggregation behind the paper's crowdworker numbers.
- `imitation_nb.generate`: Batched, resumable decoding for a base model (+ LoRA adapter), with a vLLM backend for GPUs and an OpenAI-compatible backend so the teacher is evaluated through the same code.
- `imitation_nb.sandbox`: A child process with a wall-clock timeout, resource limits, a fresh scratch directory, no secrets, no network, and (as root on Linux) its own user id and namespaces."""

__version__ = "0.1.0"
