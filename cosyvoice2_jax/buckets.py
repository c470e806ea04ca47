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


def geometric(n: int, *, per_octave: int = 16, min_step: int = 8) -> int:
    """``n`` rounded up to a geometric bucket: multiples of ``step``, where ``step`` is the power of
    two ``>= min_step`` with ``per_octave`` steps per octave of ``n`` (n in (128, 256] -> step 8,
    (256, 512] -> 16, ...). Padding is below ``1 / per_octave`` of ``n`` (6.25% at 16, about 3% on
    average) once ``n >= per_octave * min_step``, and at most ``min_step - 1`` below that, with
    ``per_octave`` programs per octave (about 64 up to 1024)."""
    if n <= min_step:
        return min_step
    step = max(min_step, 1 << max(0, (n - 1).bit_length() - 1 - (per_octave.bit_length() - 1)))
    return round_up(n, step)


def geometric_sizes(max_n: int, *, per_octave: int = 16, min_step: int = 8) -> list[int]:
    """Every :func:`geometric` bucket up to the one holding ``max_n`` (for ahead-of-time warm-up)."""
    out, n = [], 1
    while True:
        b = geometric(n, per_octave=per_octave, min_step=min_step)
        out.append(b)
        if b >= max_n:
            return out
        n = b + 1
