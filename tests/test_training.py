"""The demo's tiny ViT is accurate on clean evidence yet really relies on the planted shortcut."""

from __future__ import annotations

import numpy as np
import torch

from edgeshort.evaluation import group_accuracy
from edgeshort.models import load_adapter


def test_cached_tiny_vit_learned_the_shortcut(demo_vit, demo_data):
    test = demo_data["test"]
    adapter = load_adapter(demo_vit)
    images = np.concatenate([x for _, x in test.batches(adapter.preprocessing, 256)])
    with torch.inference_mode():
        predictions = demo_vit(torch.from_numpy(images)).argmax(1).numpy()
    table = group_accuracy(predictions, test.labels, test.groups, test.class_names)
    acc = {(c["class"], c["group"]): c["accuracy"] for c in table["cells"]}
    assert table["average"] >= 0.85  # balanced test split: every (class, artefact) cell has 200 images
    # Groups where the artefact's training correlation points to the wrong class, against those
    # where it agrees (Waterbirds-style: benign without it, malignant with it).
    conflicting = (acc[("benign", "no artefact")] + acc[("malignant", "artefact")]) / 2
    aligned = (acc[("benign", "artefact")] + acc[("malignant", "no artefact")]) / 2
    assert aligned - conflicting >= 0.25
    # The artefact-bearing malignant images are where the shortcut bites.
    assert table["worst"] == acc[("malignant", "artefact")]
