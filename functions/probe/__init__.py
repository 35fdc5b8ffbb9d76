from functions.probe.handler import function

__all__ = ["function"]
