"""Bundled models, by architecture name (``model.arch`` in configs)."""

from ..errors import ConfigError
from .common import DecoderConfig
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig

ARCHS: dict[str, tuple[type[DecoderConfig], type]] = {
    GPTConfig.arch: (GPTConfig, GPT),
    LlamaConfig.arch: (LlamaConfig, Llama),
}


def config_class(arch: str) -> type[DecoderConfig]:
    """The config class of a bundled architecture (``"gpt"`` or ``"llama"``)."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch][0]


def build_model(config: DecoderConfig, p=None):
    """The bundled model of ``config``'s architecture, under parametrization ``p``."""
    return ARCHS[config.arch][1](config, p)


__all__ = ["ARCHS", "GPT", "GPTConfig", "Llama", "LlamaConfig", "build_model", "config_class"]
