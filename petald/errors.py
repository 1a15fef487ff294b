"""Errors a user can act on. Every message names the problem and, where there is one, the fix."""


class PetalError(Exception):
    """Base of every error Petal raises on purpose."""


class CheckpointError(PetalError, ValueError):
    """A model checkpoint is missing, incomplete or corrupt."""


class UnsupportedModelError(PetalError, ValueError):
    """The checkpoint's architecture has no Petal adapter."""


class SpanError(PetalError, ValueError):
    """A block span is empty or outside the model."""


class AdapterError(PetalError, ValueError):
    """A LoRA adapter is missing, unsupported, made for another model, or not served here."""
