"""loudnorm: EBU R128 two-pass loudness normalisation (see handler.py)."""

from functions.loudnorm.handler import function

__all__ = ["function"]
