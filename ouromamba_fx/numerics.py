"""Numbers every layer shares: the smallest scale, the bit width that means "float", and the
integer range of a bit width.

Plain Python, no imports: the C++/Triton kernel wrappers, the ops, the passes and the configs
all read these, so they live below all of them.

* :data:`EPS` -- the smallest quantization scale. A dynamic scale is ``max(amax / qmax, EPS)``,
  so an all-zero row quantizes to zeros and nothing divides by zero.
* :data:`FLOAT_BITS` -- a bit width ``>= FLOAT_BITS`` means "keep in floating point" (weights,
  activations, outliers, scan states alike).
* :func:`qmax` -- the largest symmetric level ``2 ** (bits - 1) - 1``: 7 at 4 bits, 127 at 8.
"""

from __future__ import annotations

EPS = 1e-8
FLOAT_BITS = 16


def is_float(bits: int) -> bool:
    """Whether ``bits`` means "not quantized" (``bits >= FLOAT_BITS``)."""
    return bits >= FLOAT_BITS


def qmax(bits: int) -> int:
    """``2 ** (bits - 1) - 1``, the largest level of a symmetric ``bits``-bit range. No range
    check: callers that store codes in int8 use :func:`int8_qmax`."""
    return 2 ** (bits - 1) - 1


def int8_qmax(bits: int) -> int:
    """:func:`qmax` for codes stored in int8 (``bits`` an int in 2..8), else ``ValueError``."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] (int8 storage), got {bits!r}")
    return qmax(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric ``[-qmax, qmax]`` (e.g. [-7, 7] at 4 bits), else ``[-qmax - 1, qmax]``."""
    q = qmax(bits)
    return (-q, q) if symmetric else (-q - 1, q)
