import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Without CUDA the Triton kernels are tested under Triton's interpreter. The variable must be
# set before anything imports triton (torch._dynamo does): Triton's own library functions
# (tl.sum, tl.randint) are interpreted or compiled according to it when they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "danlu",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI (.ci/run): the same examples on every run, so a red build is reproducible, and no example
# database left behind.
settings.register_profile(
    "ci",
    parent=settings.get_profile("danlu"),
    max_examples=60,
    derandomize=True,
    database=None,
    print_blob=True,
)
# A long local fuzzing session: HYPOTHESIS_PROFILE=deep pytest tests/test_fuzz_*.py
settings.register_profile("deep", parent=settings.get_profile("danlu"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "danlu"))

# The tests use tiny tensors: intra-op threads only add synchronisation, and with pytest-xdist
# on a 2-core CI machine they oversubscribe the cores (10-50x slower steps under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
