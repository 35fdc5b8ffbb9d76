"""ingest: MinIO bucket notifications and CloudEvents / JobSubmit requests -> jobs."""

from functions.ingest.handler import function

__all__ = ["function"]
