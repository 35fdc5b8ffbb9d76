from functions.audio_extract.handler import function

__all__ = ["function"]
