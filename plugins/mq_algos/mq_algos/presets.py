"""Named qconfig presets combining the algorithms with any backend (``w4a4-lsq``, ...)."""

from mq_core import QConfigPreset

PRESETS: list[QConfigPreset] = []
