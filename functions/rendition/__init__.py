from functions.rendition.handler import function

__all__ = ["function"]
