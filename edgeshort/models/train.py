"""Train edgeshort's tiny ViT on the synthetic shortcut data, on CPU, seeded and cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeshort._progress import progress_bar
from edgeshort.data import ImageDataset, SyntheticConfig, generate
from edgeshort.data.synthetic import GENERATOR_VERSION
from edgeshort.models.tiny import TinyViTConfig

logger = logging.getLogger(__name__)

# Bump when the training code changes what it produces, so cached models are not reused.
TRAINING_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    model: TinyViTConfig = field(default_factory=TinyViTConfig)
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    # CPU kernels split their sums by thread count, so one seed trains different weights on 1 and
    # on 2 threads, and how far the model leans on the artefact differs with them. Pinned, the
    # demo model is the same on every machine whatever its core count.
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGESHORT_CACHE", Path.home() / ".cache" / "edgeshort"))


def cache_key(train: TrainConfig, data: SyntheticConfig) -> str:
    """Hash of what the trained weights depend on: training settings and the train split only."""
    train_data = {k: v for k, v in data.to_dict().items() if k not in ("val", "test")}
    payload = json.dumps(
        {"train": train.to_dict(), "data": train_data, "version": TRAINING_VERSION, "generator": GENERATOR_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def dataset_tensor(data: ImageDataset, adapter) -> tuple:
    import torch

    return torch.from_numpy(data.preprocessed(adapter.preprocessing, batch_size=512)), torch.from_numpy(data.labels)


def train_tiny_vit(
    train_config: TrainConfig | None = None,
    data_config: SyntheticConfig | None = None,
    datasets: dict[str, ImageDataset] | None = None,
    progress: bool = True,
):
    """Train a TinyViT on the synthetic train split; returns the model in eval mode."""
    import torch

    train_config = train_config or TrainConfig()
    data_config = data_config or SyntheticConfig(image_size=train_config.model.image_size)
    if data_config.image_size != train_config.model.image_size:
        raise ValueError(
            f"data image_size {data_config.image_size} != model image_size {train_config.model.image_size}"
        )
    datasets = datasets or generate(data_config)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(train_config.threads)
    try:
        return _train(train_config, datasets, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(train_config: TrainConfig, datasets: dict[str, ImageDataset], progress: bool):
    import torch
    from torch.nn import functional as F

    from edgeshort.models.families import TinyViTAdapter
    from edgeshort.models.tiny import TinyViT

    torch.manual_seed(train_config.seed)
    model = TinyViT(train_config.model)
    adapter = TinyViTAdapter(model)
    x, y = dataset_tensor(datasets["train"], adapter)
    optimiser = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    steps_per_epoch = (len(x) + train_config.batch_size - 1) // train_config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=train_config.lr, total_steps=train_config.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(train_config.seed)
    start = time.perf_counter()
    bar = progress_bar(range(train_config.epochs), progress, "training tiny ViT")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), train_config.batch_size):
            idx = order[i : i + train_config.batch_size]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        logger.info("epoch %d: loss %.4f, train accuracy %.3f", epoch + 1, loss_sum / total, correct / total)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
    logger.info("trained tiny ViT in %.1f s", time.perf_counter() - start)
    return model.eval()


def cached_tiny_vit(
    train_config: TrainConfig | None = None,
    data_config: SyntheticConfig | None = None,
    cache_dir: str | Path | None = None,
    datasets: dict[str, ImageDataset] | None = None,
    progress: bool = True,
):
    """The tiny ViT for these configs: loaded from the cache, or trained once and cached."""
    from edgeshort.models.loading import load_model_file, save_checkpoint

    train_config = train_config or TrainConfig()
    data_config = data_config or SyntheticConfig(image_size=train_config.model.image_size)
    path = Path(cache_dir or default_cache_dir()) / f"tiny-vit-{cache_key(train_config, data_config)}.pt"
    if path.is_file():
        logger.info("loading cached tiny ViT from %s", path)
        return load_model_file(path)
    model = train_tiny_vit(train_config, data_config, datasets, progress)
    tmp = path.with_suffix(".tmp")
    save_checkpoint(model, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return model
