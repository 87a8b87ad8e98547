"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class ListenError(Exception):
    """A problem with the user's input, files or model that has a clear, one-line explanation."""


class AudioError(ListenError):
    """An audio file that cannot be read or is unusable (missing, not audio, too short)."""


class ModelError(ListenError):
    """A model folder or repo that cannot be loaded (missing files, mismatched weights)."""


class ListenWarning(UserWarning):
    """Something the user should know about an answer that still went ahead (`warnings.warn`, never print).

    The CLI shows each one as a single `[WARNING] <message>` line; library callers filter or record them with the
    `warnings` module (e.g. `warnings.catch_warnings(record=True)`). The same facts are also kept on the returned
    objects (e.g. `AudioFeatures.truncated`, `.damage`), so runs can store them per item.
    """


class AudioWarning(ListenWarning):
    """An audio file or clip the model uses only in part: see the two subclasses."""


class TruncatedAudioWarning(AudioWarning):
    """A clip longer than Qwen2-Audio's 30 s window: the encoder sees only its first 30 s."""


class DamagedAudioWarning(AudioWarning):
    """A damaged audio file (cut short, or undecodable past some point): only the part before the damage is used."""
