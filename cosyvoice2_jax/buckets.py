"""Shape buckets shared by the batched runtime wrappers (one compiled program per bucket)."""
from __future__ import annotations


def round_up(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m``."""
    return -(-x // m) * m


def split_pow2(n: int, max_batch: int) -> list[int]:
    """Batch sizes covering ``n`` rows without padding: powers of two (at most ``max_batch``),
    largest first (13, 16 -> [8, 4, 1]); so at most log2(max_batch) + 1 shapes per length bucket."""
    sizes = []
    while n > 0:
        b = min(max_batch, 1 << (n.bit_length() - 1))
        sizes.append(b)
        n -= b
    return sizes
