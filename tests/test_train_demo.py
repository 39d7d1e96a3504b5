"""The demo's training script (scripts/train_demo.py): what its batches hold."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_object_free_rows_have_an_empty_text_target_and_no_instance_prompt(train_demo):
    images, texts, kinds, prompts, targets, weights = train_demo.make_batch(4, np.random.default_rng(0), 64, 256, p_empty=1.0)
    assert kinds == ["text"] and len(texts) == 4 and images.shape == (4, 3, 256, 256)
    assert targets.shape == (4, 1, 64, 64) and float(targets.abs().sum()) == 0.0
    assert float(images.std()) > 0  # noise and haze, stretched by the normalisation


def test_jittered_boxes_around_a_thin_object_keep_their_corners_in_order(train_demo):
    labels = np.zeros((256, 256), np.int32)
    labels[100:120, 50] = 1  # a rod 1 px wide: the jitter (5 % of 20 px) often crosses its sides
    item = train_demo._item(np.random.default_rng(0).random((256, 256)), labels, {1: "mitochondrion"})
    rng = np.random.default_rng(1)
    boxes = np.stack([train_demo.instance_task(item, "mitochondrion", "box", 1, rng, 64, 256)[0]["boxes"]
                      for _ in range(200)])
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((boxes >= 0) & (boxes <= 256)).all()
