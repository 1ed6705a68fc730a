"""Moved: :class:`TaskSet` lives in :mod:`memryx._core.aio` with the other primitives."""

from __future__ import annotations

from .aio import TaskSet as TaskSet

__all__ = ["TaskSet"]
