"""llamaforge: the LLaMA family of open, efficient foundation language models as Python software."""

from .config import ModelConfig, get_preset, preset_names
from .inference import Engine, SamplingParams
from .llm import LLM, load
from .model import Transformer, build_model, count_parameters
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "ModelConfig", "SamplingParams", "Transformer", "__version__", "build_model",
           "count_parameters", "get_preset", "load", "load_tokenizer", "preset_names"]  # fmt: skip
