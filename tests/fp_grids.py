"""Independent enumerations of low-precision number grids, for tests of fake quantisation."""

import torch


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value (sign, 4 exponent bits with bias 7, 3 mantissa bits;
    exponent 15 with mantissa 7 is NaN), from the bit layout rather than from torch's cast."""
    vals = {0.0}
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals |= {v, -v}
    return torch.tensor(sorted(vals), dtype=torch.float64)
