import os

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
