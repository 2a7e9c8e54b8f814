"""The array types every module of the runtime speaks: images, crops, masks and embeddings.

Images are ``[N, H, W, C]`` or ``[H, W, C]``, RGB; float32 arrays hold 0..255 values, uint8 arrays
the pixels as files store them.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

Float32Array: TypeAlias = NDArray[np.float32]
Float64Array: TypeAlias = NDArray[np.float64]
Uint8Array: TypeAlias = NDArray[np.uint8]
IntArray: TypeAlias = NDArray[np.intp]
BoolArray: TypeAlias = NDArray[np.bool_]
