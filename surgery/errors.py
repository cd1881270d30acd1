"""User-facing errors. Each message says what was found and what to do; the CLI prints it as one
line and exits 2. `assert` stays for internal invariants only."""


class SurgeryError(Exception):
    """Base of every error a user can cause and fix."""


class UnsupportedModel(SurgeryError):
    """A patch cannot run on this model; the message says why and what would work."""


class ModelNotFound(SurgeryError):
    """A model reference could not be resolved to weights or a config."""


class OutputExists(SurgeryError):
    """An output path exists and overwriting was not asked for."""


class InvalidParams(SurgeryError):
    """Patch or command parameters failed validation."""


class PatchDidNotTakeEffect(SurgeryError):
    """A patch ran but the model does not show its effect (a bug, never silent)."""


class UnsafeOutput(SurgeryError):
    """An output cannot be written where asked (it is the source, an ancestor of the working
    directory, something surgery did not write, or the location is not writable)."""


class OutputBusy(SurgeryError):
    """Another process holds the lock on an output."""


class UnsafeInput(SurgeryError):
    """A checkpoint is corrupt, incomplete, or would need foreign code (remote code, pickles)."""
