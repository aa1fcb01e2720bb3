"""Bundled models."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
