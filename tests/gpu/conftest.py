import os
import sys


def pytest_sessionfinish(session, exitstatus):
    """For benchmarks/gpu_check.py: the top-level modules this run imported (the wheel list must cover them)."""
    path = os.environ.get("FXCACHE_IMPORT_LOG")
    if path:
        names = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                    if not name.startswith("_") and getattr(module, "__file__", None)})  # no builtins
        with open(path, "w") as fh:
            fh.write("\n".join(names) + "\n")
