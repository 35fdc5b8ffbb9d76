from functions.thumbnail.handler import function

__all__ = ["function"]
