from functions.noop.handler import function

__all__ = ["function"]
