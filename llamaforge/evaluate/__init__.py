"""Evaluation: sliding-window perplexity (with KL divergence against a reference model), the multiple-choice
benchmarks of the LLaMA paper (scored by log-likelihood with shared contexts run once), and its generative
benchmarks (closed-book QA, math, code) generated on the shared engine, with generated code run in a sandbox.

Command line: ``llamaforge perplexity`` and ``llamaforge eval``; lm-evaluation-harness can drive
llamaforge models through ``lm_eval --model llamaforge`` (see ``lm_eval_plugin``).
"""

from .generative import evaluate_generative, score_generations
from .generative_tasks import GENERATIVE_TASKS, GenerativeTask, get_generative_task, split_tasks
from .metrics import confidence_interval, pass_at_k, wilson_interval
from .perplexity import PerplexityResult, combine, perplexity, sliding_windows
from .report import TaskResult, generative_table, markdown_table, mean_stderr, results_json, write_samples
from .runner import evaluate_tasks, score_items
from .sandbox import ExecResult, Sandbox, SandboxLimits, SandboxUnavailableError
from .scoring import Score, Scorer, encode_pair, text_encoder
from .tasks import TASKS, Item, Task, build_items, get_task, load_records, parse_tasks

__all__ = ["GENERATIVE_TASKS", "TASKS", "ExecResult", "GenerativeTask", "Item", "PerplexityResult", "Sandbox",
           "SandboxLimits", "SandboxUnavailableError", "Score", "Scorer", "Task", "TaskResult", "build_items",
           "combine", "confidence_interval", "encode_pair", "evaluate_generative", "evaluate_tasks",
           "generative_table", "get_generative_task", "get_task", "load_records", "markdown_table", "mean_stderr",
           "parse_tasks", "pass_at_k", "perplexity", "results_json", "score_generations", "score_items",
           "sliding_windows", "split_tasks", "text_encoder", "wilson_interval", "write_samples"]  # fmt: skip
