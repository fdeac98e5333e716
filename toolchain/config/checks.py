"""Range and choice checks every config section uses: one line naming the key, what it got and what it takes."""

from __future__ import annotations

from pathlib import Path

from toolchain.errors import UserError


def choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}")


def existing_file(key: str, value: str) -> str:
    if not Path(value).expanduser().is_file():
        raise UserError(f"{key}: file not found: {value}")
    return value


def non_negative(key: str, value) -> None:
    if value < 0:
        raise UserError(f"{key} must be >= 0, got {value}")


def positive(key: str, value) -> None:
    if value <= 0:
        raise UserError(f"{key} must be > 0, got {value}")
