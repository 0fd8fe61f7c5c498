"""deepcell-toolbox's pre-processing written plainly from NumPy and scikit-image: the
reference the numba kernels must match (used by the tests and benchmarks/bench_normalize.py)."""

import numpy as np

# The kiosk-kernels bench baseline composes CLAHE exactly as deepcell-toolbox does; one copy.
from kiosk_pipeline.bench.reference import (
    histogram_normalization as reference_histogram_normalization,
)

__all__ = ["reference_histogram_normalization", "reference_normalize",
           "reference_percentile_threshold"]


def reference_percentile_threshold(image, percentile=99.9):
    processed = np.zeros_like(image)
    for b in range(image.shape[0]):
        for c in range(image.shape[-1]):
            channel = np.copy(image[b, ..., c])
            nonzero = channel[np.nonzero(channel)]
            if len(nonzero) > 0:
                limit = np.percentile(nonzero, percentile)
                channel[channel > limit] = limit
                processed[b, ..., c] = channel
    return processed


def reference_normalize(image, epsilon=1e-7):
    image = image.astype("float32")
    for b in range(image.shape[0]):
        for c in range(image.shape[-1]):
            channel = image[b, ..., c]
            image[b, ..., c] = (channel - channel.mean()) / (channel.std() + epsilon)
    return image
