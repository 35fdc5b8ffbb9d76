from functions.watermark.handler import function

__all__ = ["function"]
