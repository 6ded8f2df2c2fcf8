"""`ConfigError` and the value checks the component config dataclasses share.

A leaf module (no project or heavy imports) so that every `*/config.py` can use it and
`qwenvl_train/config.py` can compose them without an import cycle.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key."""


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
