"""The one base class of the errors audioshard reports to its users."""


class AudioshardError(Exception):
    """Something in the data, the settings or the machine stops a command; the message names the file
    or setting and the fix. The command line prints it without a traceback, and a library user can
    catch this one type. Each stage's error also keeps its built-in base (ValueError, OSError...)."""


class BuildError(AudioshardError, RuntimeError):
    """The build cannot go on (bad input folder, nothing usable, refusing to overwrite)."""


class SourceError(AudioshardError, OSError):
    """A file of a build could not be read; the message names the path or URL and the fix."""


class ManifestError(AudioshardError, ValueError):
    """The manifest (or one of its list files) is missing, unreadable or inconsistent."""


class IntegrityError(SourceError):
    """A shard's bytes do not match the manifest (size or sha256): truncated, corrupt or tampered."""


class TransientError(Exception):
    """A transient failure worth another attempt (raised by the HTTP and S3 readers, caught by the retry loop)."""

    def __init__(self, message: str, integrity: bool = False):
        super().__init__(message)
        self.integrity = integrity
