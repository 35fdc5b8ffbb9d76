from functions.conductor.handler import function

__all__ = ["function"]
