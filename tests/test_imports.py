"""What `import fxcache` alone makes available, checked in a fresh interpreter (no test has imported more)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_fxcache_makes_deploy_available_without_optional_dependencies():
    code = ("import sys, fxcache\n"
            "assert fxcache.deploy.CachedSession.__name__ == 'CachedSession'\n"
            "print(sorted(m for m in ('onnxruntime', 'onnx', 'torch_tensorrt') if m in sys.modules))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", "optional dependencies load only when asked for"
