import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

from moewm.config import EncoderConfig, ExtractorConfig, WatermarkConfig  # noqa: E402
from moewm.engine.keys import WatermarkKey  # noqa: E402
from moewm.models.micro import byte_tokenizer, micro_model  # noqa: E402

TEST_SECRET = "unit-test-secret-5f1c"


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def micro_qwen():
    return micro_model("qwen2_moe")


@pytest.fixture
def key():
    return WatermarkKey(TEST_SECRET, 0)


@pytest.fixture
def small_cfgs():
    return ExtractorConfig(), EncoderConfig(num_bits=16, pool_size=8), WatermarkConfig(delta=4.0)


PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "In the beginning there was",
    "import numpy as np",
    "Dear committee members,",
    "The results show that",
    "def main():",
    "It was a dark and stormy",
]


# -- progress per file: the terminal names each test file as it starts (default verbosity) and, when it ends, how
# long it took, so a long file (test_validity.py) is visibly alive and the slow ones are easy to find. The closing
# "N passed" line is pytest's own.
_PROGRESS: dict = {"config": None, "left": {}, "started": {}}


def pytest_configure(config):
    _PROGRESS["config"] = config


def pytest_collection_finish(session):
    left = _PROGRESS["left"] = {}
    for item in session.items:
        path = item.nodeid.split("::", 1)[0]
        left[path] = left.get(path, 0) + 1


def pytest_runtest_logstart(nodeid, location):
    _PROGRESS["started"].setdefault(nodeid.split("::", 1)[0], time.perf_counter())


def pytest_runtest_logfinish(nodeid, location):
    path = nodeid.split("::", 1)[0]
    left = _PROGRESS["left"]
    left[path] = left.get(path, 1) - 1
    config = _PROGRESS["config"]
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
    if left[path] == 0 and path in _PROGRESS["started"] and reporter is not None and reporter.verbosity >= 0:
        reporter.write(f" {time.perf_counter() - _PROGRESS['started'][path]:.0f} s")
