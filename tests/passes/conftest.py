import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pass_helpers import capture  # noqa: E402


@pytest.fixture
def dit():
    """(Dynamo graph, analysis) of the tiny DiT."""
    return capture("dit")
