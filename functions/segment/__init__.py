from functions.segment.handler import function

__all__ = ["function"]
