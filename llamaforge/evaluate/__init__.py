"""Evaluation: sliding-window perplexity (with KL divergence against a reference model) and the
multiple-choice benchmarks of the LLaMA paper, scored by log-likelihood with shared contexts run once.

Command line: ``llamaforge perplexity`` and ``llamaforge eval``; lm-evaluation-harness can drive
llamaforge models through ``lm_eval --model llamaforge`` (see ``lm_eval_plugin``).
"""

from .perplexity import PerplexityResult, combine, perplexity, sliding_windows
from .report import TaskResult, markdown_table, mean_stderr, results_json
from .runner import evaluate_tasks, score_items
from .scoring import Score, Scorer, encode_pair, text_encoder
from .tasks import TASKS, Item, Task, build_items, get_task, load_records, parse_tasks

__all__ = ["TASKS", "Item", "PerplexityResult", "Score", "Scorer", "Task", "TaskResult", "build_items", "combine",
           "encode_pair", "evaluate_tasks", "get_task", "load_records", "markdown_table", "mean_stderr",
           "parse_tasks", "perplexity", "results_json", "score_items", "sliding_windows", "text_encoder"]  # fmt: skip
