"""montage: several clips into one video (see handler.py)."""

from functions.montage.handler import function

__all__ = ["function"]
