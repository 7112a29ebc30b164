"""An OpenAI-compatible HTTP server with continuous batching: ``llamaforge serve`` or ``create_app()``."""

from .api import APIError, ServerConfig, create_app, server_state

__all__ = ["APIError", "ServerConfig", "create_app", "server_state"]
