"""What bench/isolate.py's forkserver imports once, before any part forks from it: torch and the
modules of the benchmarks, which would otherwise take each part seconds to import again.

Each import is guarded: a module that is broken (or half-edited) must fail its own part, where the
part imports it again and reports the error, not the server that every part forks from. None of
these modules starts a thread or touches CUDA when imported, which keeps forking from here safe.
"""

import importlib

MODULES = (
    "torch",
    "torchvision",
    "sqlalchemy",
    "bench.common",
    "bench.environment",
    "bench.train_throughput",
    "bench.predict",
    "bench.input_pipeline",
    "bench.paper_protocol",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - reported by the part that needs it
        pass
