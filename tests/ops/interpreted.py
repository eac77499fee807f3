"""The marks every interpreter test module applies (`pytestmark = INTERPRETED`)."""

import os

import pytest

INTERPRETED = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on machines without a GPU; tests/gpu covers GPUs",
    ),
    # Raised inside Triton's interpreter on every scalar index, not by our code.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]
