from functions.deadletter.handler import function

__all__ = ["function"]
