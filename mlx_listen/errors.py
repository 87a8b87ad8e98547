"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class ListenError(Exception):
    """A problem with the user's input, files or model that has a clear, one-line explanation."""


class AudioError(ListenError):
    """An audio file that cannot be read or is unusable (missing, not audio, too short)."""


class ModelError(ListenError):
    """A model folder or repo that cannot be loaded (missing files, mismatched weights)."""
