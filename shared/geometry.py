"""Output sizes: fitting a displayed picture into bounds with even dimensions.

The displayed size itself (pixel aspect ratio and rotation applied) is
``VideoStream.display_size`` in :mod:`shared.media.probe`.
"""

from __future__ import annotations


def fit(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """Largest even size within the bounds that keeps the aspect ratio (never upscales).

    Even, because yuv420p (what every player decodes) subsamples chroma by two.
    """
    scale = min(1.0, max_width / width, max_height / height)
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
