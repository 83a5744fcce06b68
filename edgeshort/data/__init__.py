"""Datasets: synthetic shortcut data, ImageFolder trees, CSV listings and the seed's folder layout."""

from edgeshort.data.dataset import (
    ArrayDataset,
    ImageDataset,
    ImageFolder,
    as_dataset,
    as_images,
    concat,
    dataset_from_source,
    input_digests,
    load_images,
    load_seed_layout,
    load_unlabelled,
    merge_classes,
    parse_class_map,
    parse_columns,
    write_seed_layout,
)
from edgeshort.data.manifest import load_manifest
from edgeshort.data.synthetic import CLASS_NAMES, SplitSpec, SyntheticConfig, generate, generate_split

__all__ = [
    "ArrayDataset",
    "as_dataset",
    "as_images",
    "CLASS_NAMES",
    "ImageDataset",
    "ImageFolder",
    "SplitSpec",
    "SyntheticConfig",
    "concat",
    "dataset_from_source",
    "generate",
    "generate_split",
    "input_digests",
    "load_images",
    "load_manifest",
    "load_seed_layout",
    "load_unlabelled",
    "merge_classes",
    "parse_class_map",
    "parse_columns",
    "write_seed_layout",
]
