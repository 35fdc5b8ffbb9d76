from functions.janitor.handler import function

__all__ = ["function"]
