"""Every error the studio raises on purpose, with a message a user can act on."""


class StudioError(Exception):
    """Base class: an error caused by the user's input or environment, not a bug."""


class ModelLoadError(StudioError):
    """A base model (or the evaluator) could not be found or read."""


class AdapterError(StudioError):
    """An adapter file is unreadable, unsafe, or does not fit the base model."""


class DataError(StudioError):
    """A training image folder or caption file cannot be used."""


class ConfigError(StudioError):
    """An unknown method, scheduler or option value."""
