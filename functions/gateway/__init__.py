from functions.gateway.app import function

__all__ = ["function"]
