from functions.concat.handler import function

__all__ = ["function"]
