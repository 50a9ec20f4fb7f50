"""The exceptions lorakit raises for a user's mistake.

Each is a ``ValueError`` too, so code that already catches ``ValueError`` keeps working; the
CLI catches ``LorakitError`` and prints its message as one line instead of a traceback.
"""


class LorakitError(ValueError):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(LorakitError):
    """A LoraConfig field or an adapter_config.json value is invalid or unsupported."""


class TargetError(LorakitError):
    """A target pattern matched nothing, or matched a module lorakit cannot adapt."""


class AdapterFileError(LorakitError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""


class MergeError(LorakitError):
    """A merge was refused (non-finite result) or is impossible in the current state."""
