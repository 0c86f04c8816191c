"""The optional C extension: ``lightning_wd._rate_kernel``, EffectiveLRMonitor's statistics pass fused into one read
of the optimizer state (``src/lightning_wd/_rate_kernel.c``). Everything else is in ``pyproject.toml``.

``optional=True``: without a C compiler the install goes on without it, and the monitor uses its eager torch pass
(the same statistics, about twice the time on a CPU; BENCHMARKS.md).
"""

import sys

from setuptools import Extension, setup

# -fno-math-errno lets sqrtf become the vector instruction; nothing here allows reassociation (no -ffast-math), and
# -ffp-contract=off keeps an FMA from fusing two roundings into one, so every rate is computed as torch computes it.
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which keeps the loops from vectorizing as well (1.2 against
# 0.87 ms per million elements; the kernel has no signed overflow)
flags = (["/O2", "/fp:precise"] if sys.platform == "win32"
         else ["-O3", "-fno-wrapv", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"])

setup(
    ext_modules=[
        Extension(
            "lightning_wd._rate_kernel",
            ["src/lightning_wd/_rate_kernel.c"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
