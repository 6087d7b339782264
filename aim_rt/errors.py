"""Errors aim-rt raises on bad input. Each message names what to change."""


class AiMError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(AiMError, ValueError):
    """A model config that aim-rt cannot build."""


class CheckpointError(AiMError):
    """A checkpoint that is missing, corrupt, or does not match its config (the key is named)."""


class SamplingError(AiMError, ValueError):
    """Bad sampling arguments: classes, seeds, cfg scale, top-k, top-p, temperature, prefix."""


class OutputError(AiMError):
    """An output or export directory that holds a different job, is in use, or holds damaged files."""


class UsageError(AiMError, ValueError):
    """A flag or file the user passed that cannot work as given (the flag is named)."""


class WriteError(OutputError):
    """The operating system refused a write (full disk, read-only, permissions); `cause` is the OSError."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.cause = cause
