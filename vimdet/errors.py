"""Wrapping an error in a clearer message without changing its type or losing its cause."""

from __future__ import annotations

__all__ = ["same_type_error"]


def same_type_error(error: BaseException, message: str) -> BaseException:
    """A new exception of ``error``'s type (or its nearest base that takes one message).

    Raise it ``from error`` so that the cause stays chained. Types whose constructor needs more
    than a message (``json.JSONDecodeError``, ``UnicodeDecodeError``) fall back to their nearest
    base class that accepts one (``ValueError``), so ``except ValueError`` still catches it.
    """
    for cls in type(error).__mro__:
        try:
            return cls(message)
        except TypeError:
            continue
    return Exception(message)  # pragma: no cover - BaseException always takes one argument
