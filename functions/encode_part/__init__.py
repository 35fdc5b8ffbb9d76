from functions.encode_part.handler import function

__all__ = ["function"]
