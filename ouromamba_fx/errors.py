"""Exceptions raised by ouromamba-fx. Each message names the module or file involved and what to do."""


class OuroMambaError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(OuroMambaError):
    """A checkpoint file cannot be read, or does not match the model."""


class CaptureError(OuroMambaError):
    """A model cannot be traced to a torch.fx graph."""


class DataError(OuroMambaError):
    """An image folder or calibration data is unusable."""


class InputError(OuroMambaError, ValueError):
    """An input a model cannot take: wrong type, dtype, shape or device."""


class InferenceOnlyError(OuroMambaError, RuntimeError):
    """Gradients were asked of a quantized model, which computes no gradients."""


class UnknownNameError(OuroMambaError, KeyError):
    """A name (model, preset) that is not registered; still a ``KeyError`` for ``except KeyError``."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class ExportError(OuroMambaError):
    """A quantized model cannot be exported or compiled for deployment as asked."""


class UnsafeFileError(OuroMambaError, ValueError):
    """A file refused before anything in it was loaded: it holds something the package never writes
    (code, pickles, native libraries, ops outside its allowlist)."""
