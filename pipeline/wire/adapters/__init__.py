"""Protocol adapters, registered by name the way a plugin would be.

A protocol is one module (its request body, its stream fold, its options and key
variables) and one line here; nothing else names it.
"""

from __future__ import annotations

from .anthropic_messages import AnthropicMessages
from .base import Adapter, FollowUp, RequestSpec
from .gemini import Gemini
from .openai_chat import OpenAIChat
from .openai_responses import OpenAIResponses

ADAPTERS: dict[str, type[Adapter]] = {"openai": OpenAIChat, "anthropic": AnthropicMessages,
                                      "responses": OpenAIResponses, "gemini": Gemini}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]()
    except KeyError:
        raise ValueError(f"unknown --api {name!r}; choose from {', '.join(ADAPTERS)}") from None


def key_variables() -> tuple[str, ...]:
    """Every environment variable any protocol reads its key from (for the redactor)."""
    return tuple(dict.fromkeys(v for a in ADAPTERS.values() for v in a.key_env))


__all__ = ["ADAPTERS", "Adapter", "FollowUp", "RequestSpec", "get_adapter", "key_variables"]
