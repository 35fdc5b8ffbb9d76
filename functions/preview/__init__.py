from functions.preview.handler import function

__all__ = ["function"]
