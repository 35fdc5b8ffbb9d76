from functions.gateway.server import function

__all__ = ["function"]
