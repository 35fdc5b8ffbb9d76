from functions.calibrate.handler import function

__all__ = ["function"]
