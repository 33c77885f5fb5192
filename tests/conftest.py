import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
# every variant built by a test is checked after each pass (fxcache/passes/checks.py)
os.environ.setdefault("FXCACHE_CHECK_PASSES", "1")

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# one thread per pytest-xdist worker (the README runs two on two cores), else two
_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("FXCACHE_TEST_THREADS", _THREADS)))
# Every test compiles fresh model instances of the same classes: keep Dynamo from hitting its recompile limit.
torch._dynamo.config.cache_size_limit = 512
torch._dynamo.config.accumulated_cache_size_limit = 4096


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


#: the files that take longest (about 60-100 s each on the 2-core machine), run first: pytest-xdist hands out whole
#: files in collection order, so a long file collected last would leave one worker running it alone
LONGEST_FIRST = ("reliability/test_requests.py", "export/test_onnx_loop.py", "test_end_to_end.py",
                 "test_more_models.py", "reliability/test_artifacts.py", "reliability/test_serving.py",
                 "methods/test_toca.py", "quality/test_peers.py", "test_check_families.py", "test_check_model.py",
                 "docs/test_readme.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = os.path.relpath(str(item.path), os.path.dirname(__file__)).replace(os.sep, "/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
