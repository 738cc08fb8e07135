"""The one base class of the errors audioshard reports to its users."""


class AudioshardError(Exception):
    """Something in the data, the settings or the machine stops a command; the message names the file
    or setting and the fix. The command line prints it without a traceback, and a library user can
    catch this one type. Each stage's error also keeps its built-in base (ValueError, OSError...)."""


class BuildError(AudioshardError, RuntimeError):
    """The build cannot go on (bad input folder, nothing usable, refusing to overwrite)."""
