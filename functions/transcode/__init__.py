from functions.transcode.handler import function

__all__ = ["function"]
