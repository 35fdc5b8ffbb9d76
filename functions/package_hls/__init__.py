from functions.package_hls.handler import function

__all__ = ["function"]
