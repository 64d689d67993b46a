"""The exceptions mq raises on bad input.

Every error a user can cause is an ``MQError``: its message says what is wrong and what to do about it, so the
CLI can print it as one paragraph instead of a traceback from deep inside torch. Subclasses exist so callers and
tests can tell the failure classes apart; they add no behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class MQError(Exception):
    """Base class of all user-facing errors; ``str(err)`` is the whole explanation, fix included."""


class UnknownNameError(MQError, LookupError):
    """A backend, observer, exporter ... name that no installed distribution provides."""


class PluginConflictError(MQError):
    """Two distributions registered the same name in one registry and no preference picks one."""


class PluginLoadError(MQError):
    """A plugin could not be imported or its hook raised; it was skipped."""


class TraceError(MQError):
    """torch.fx could not capture the model."""


class SchemeError(MQError, ValueError):
    """An invalid quantization scheme or one the chosen target cannot run (e.g. 4-bit on an 8-bit runtime)."""


class CalibrationError(MQError):
    """Calibration data was empty, non-finite, or quantization was enabled before calibration."""


class ExportError(MQError):
    """An artifact cannot be written: uncalibrated model, unsupported op, ..."""


class VerificationError(MQError):
    """A runtime could not run an artifact."""


class ConfigError(MQError, ValueError):
    """An invalid option value (config file, CLI flag, method config)."""


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception from user code or a library, on one line without a closing period, so an
    ``MQError`` quoting it stays one paragraph (torch and fx messages often span lines)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(".: ")


def check_choice(option: str, value: Any, choices: Iterable[Any], hint: str = "") -> None:
    """Refuse an option value outside ``choices`` with one ``ConfigError`` wording for every exporter and plugin;
    ``hint`` (a sentence, starting with a space) says what the choices are for."""
    allowed = list(choices)
    if value not in allowed:
        raise ConfigError(f"option {option} must be one of {allowed}, got {value!r}.{hint}")
