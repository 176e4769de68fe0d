"""The inference precisions (inference.precision, `aigid detect --precision`), applied by
:func:`aigid.detector.runtime.autocast`. A module of its own so that `aigid detect` gets the names without importing the
params models (pydantic).

- auto: bf16 autocast on CUDA, float32 on the CPU (the numbers CPU training produced)
- bf16: bf16 autocast on any device; on a CPU with bf16 instructions (AVX512-BF16, AMX) about twice the float32
  speed of the paper-size encoders
- fp32: float32 everywhere
"""

from typing import Literal

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = Precision.__args__
