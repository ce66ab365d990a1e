"""Every error histoboost raises on purpose: one message a user can act on, printed by the command line as one
line without a traceback. One class per part of the house, all under `HistoboostError`, so a caller catches one."""

from __future__ import annotations

from typing import Any


class HistoboostError(Exception):
    """An error the user can fix: the command line prints its message as one line, no traceback."""


class ConfigError(HistoboostError, ValueError):
    """A configuration value or file that cannot be used; the message says which and how to fix it."""


class DataError(HistoboostError):
    """The data cannot be used as given; `problems` lists every reason, one `data.Problem` per file."""

    def __init__(self, message: str, problems: tuple[Any, ...] = ()):
        super().__init__(message)
        self.problems = problems


class StorageError(HistoboostError):
    """A store location that cannot be used; the message says what to do."""


class OutputError(HistoboostError):
    """An output place cannot be used; the message says what to do."""


class StainError(HistoboostError, ValueError):
    """Normalisation is impossible for this image (e.g. blank); the message says why."""


class BackboneError(HistoboostError):
    """A backbone or its weights cannot be had; the message says what to do."""


class FeatureStoreError(HistoboostError):
    """The feature store cannot be used as found; the message says what to do."""


class FinetuneError(HistoboostError):
    """Fine-tuning cannot run as asked; the message says why and what to change."""


class EvaluationError(HistoboostError):
    """Cross-validation cannot be run as asked; the message says why and what to change."""


class EngineError(HistoboostError):
    """The engine cannot start or reach its workers; the message says what to do."""


class BundleError(HistoboostError):
    """A bundle cannot be written or used; the message says why."""


class SigningError(HistoboostError):
    """A key or signature cannot be used; the message says why."""


class SlideError(HistoboostError):
    """A slide cannot be read or used; the message names the file and the fix."""


class ViewerError(HistoboostError):
    """A result cannot be shown; the message names it and the fix."""


class DatasetError(DataError):
    """A data set that cannot be fetched, checked or unpacked (`histoboost datasets`)."""


class UsageError(HistoboostError):
    """A flag or file given on the command line cannot be used."""
