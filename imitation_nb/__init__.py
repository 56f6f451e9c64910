"""Notebook-first, reproducible companion to 'The False Promise of Imitating Proprietary LLMs' (Gudibande et al., 2023)

Modules:

- `imitation_nb.eval_human`: Study builder, MTurk export/import, a local rating page (SQLite), and the aggregation behind the paper's crowdworker numbers."""

__version__ = "0.1.0"
