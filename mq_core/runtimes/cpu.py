"""What the host CPU means for integer kernels.

On x86 CPUs without VNNI, the u8 x s8 int8 kernels of ONNX Runtime (``QLinearConv``/``QGemm``) and OpenVINO
multiply with ``vpmaddubsw``, which adds pairs of products in int16 and saturates (255 * 127 * 2 > 32767). With
full 8-bit weights their results can be tens of steps away from the exact arithmetic; 7-bit weights
(``qconfig="reduce-range"``) avoid it for weight layers. CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) accumulate
in int32 and do not saturate.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: CPU flags that give int8 dot products without int16 intermediates.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

SATURATION_NOTE = (
    "this CPU has no VNNI: int8 kernels add pairs of u8 x s8 products in int16 and saturate with 8-bit weights; "
    "quantize with qconfig 'reduce-range' (7-bit weights) or check on the deployment hardware"
)


@functools.cache
def int8_may_saturate() -> bool:
    """Whether this is an x86 CPU without VNNI (Linux: flags from /proc/cpuinfo). False when it cannot tell."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in ("x86_64", "amd64", "i686") or not cpuinfo.is_file():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool(flags) and not VNNI_FLAGS & set(flags)
