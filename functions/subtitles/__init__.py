from functions.subtitles.handler import function

__all__ = ["function"]
