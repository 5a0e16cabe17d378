"""Protocol adapters, registered by name the way a plugin would be."""

from __future__ import annotations

from .anthropic_messages import AnthropicMessages
from .base import Adapter
from .openai_chat import OpenAIChat

ADAPTERS: dict[str, type] = {"openai": OpenAIChat, "anthropic": AnthropicMessages}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown --api {name!r}; choose from {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "Adapter", "get_adapter"]
