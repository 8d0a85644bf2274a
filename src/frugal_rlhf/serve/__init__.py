"""Serve a model over an OpenAI-compatible HTTP API (`frugal serve`).

Importing this package stays cheap (no FastAPI): the command helpers import the web
stack only when a server is actually started, so `frugal --help` and `frugal chat`
work without the `serve` extra.
"""
from frugal_rlhf.serve.command import add_serve_args, cmd_serve

__all__ = ["add_serve_args", "cmd_serve"]
