"""Shared fixtures: one small toy world per test session (built in ~10 s, CPU only)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    import toy

    return toy.build(tmp_path_factory.mktemp("toy"), seed=0, n_train=32, n_val=8)


@pytest.fixture(scope="session")
def toy_vision():
    import toy
    from data import VisionSpec

    return VisionSpec(**toy.TOY_VISION)


@pytest.fixture(scope="session")
def toy_model(toy_world):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "model", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(toy_world / "model")
    return model.eval(), processor


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory):
    """The toy model with Qwen2.5-VL-7B-Instruct's real tokenizer and vocabulary, saved as the 7B is published
    (toy_qwen.build_model_dir, ~5 s). Its data: toy_world's."""
    import toy_qwen

    out = tmp_path_factory.mktemp("qwen_toy")
    toy_qwen.build_model_dir(out, None, seed=0, qwen=True)
    return out


@pytest.fixture(scope="session")
def qwen_model(qwen_model_dir):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(qwen_model_dir)
