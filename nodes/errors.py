"""Error messages that name the node, the input, what was expected and what to do."""

from __future__ import annotations


class DANodeError(ValueError):
    """A node refused its input; ``str()`` is the whole message shown in ComfyUI."""


def node_error(node: str, input_name: str, expected: str, got: str, fix: str) -> DANodeError:
    return DANodeError(f"{node}: input '{input_name}' must be {expected}, got {got}. {fix}")
