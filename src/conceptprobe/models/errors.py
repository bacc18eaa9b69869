"""The models package's error type (its own module, so every loader module can raise it without cycles)."""


class ModelLoadError(RuntimeError):
    """A model reference could not be resolved or loaded; the message says what to do."""
