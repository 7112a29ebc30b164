"""llamaforge: the LLaMA family of open, efficient foundation language models as Python software."""

from .config import ModelConfig, get_preset, preset_names
from .inference import Engine, SamplingParams
from .llm import LLM, load
from .model import Transformer, build_model, count_parameters

__version__ = "0.1.0"


def load_tokenizer(source):
    """Load a tokenizer from a tokenizer.model, tokenizer.json, model directory, GGUF file, built-in model name or
    hub id (names resolve as in ``load``)."""
    from .llm import resolve_source
    from .tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(resolve_source(source))


__all__ = ["LLM", "Engine", "ModelConfig", "SamplingParams", "Transformer", "__version__", "build_model",
           "count_parameters", "get_preset", "load", "load_tokenizer", "preset_names"]  # fmt: skip
