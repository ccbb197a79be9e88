"""The project's error classes. Every error raised on purpose derives from :class:`FlareError`; the entry points
(``run_task_ft.py``, ``run.py``, ``run_translate.py``, ``python -m flare.sweep``) catch that one class and print its
message, which names the fix, as one line (exit 2) instead of a traceback. Each subclass also keeps the builtin
base it always had (``ValueError``, ``RuntimeError``), so ``except ValueError`` code keeps working."""

from __future__ import annotations


class FlareError(Exception):
    """Base of the project's errors: bad input or a state the user can fix; the message says how."""


class UsageError(FlareError, ValueError):
    """Bad command-line input, caught before any model is loaded; the message names the fix."""


class CheckpointError(FlareError, RuntimeError):
    """A checkpoint is missing, incomplete, or belongs to another task or model."""


class FusionError(FlareError, RuntimeError):
    """Fusion is configured but cannot run (no source set, lengths that do not line up, missing modules)."""


class HubError(FlareError, ConnectionError):
    """A model or data set that had to come from the Hugging Face hub could not be reached."""
