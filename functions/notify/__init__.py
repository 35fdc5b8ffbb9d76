from functions.notify.handler import function

__all__ = ["function"]
