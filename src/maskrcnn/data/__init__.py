"""Data layer: COCO-format datasets, importers, synthetic shapes, transforms, batch sampling and loaders."""

from maskrcnn.data.coco import CocoDataset, DatasetError, load_coco_json
from maskrcnn.data.collate import collate
from maskrcnn.data.importers import AnnotationImportError, labelme_to_coco, yolo_to_coco
from maskrcnn.data.loader import SeededSamples, build_test_loader, build_train_loader
from maskrcnn.data.samplers import GroupedBatchSampler, sample_generator, sample_seed
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.transforms import (
    Compose,
    LargeScaleJitter,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
)

__all__ = [
    "AnnotationImportError", "CocoDataset", "Compose", "DatasetError", "GroupedBatchSampler", "LargeScaleJitter",
    "RandomHorizontalFlip", "ResizeShortestEdge", "SeededSamples", "build_test_loader", "build_train_loader",
    "build_transforms", "collate", "generate_shapes", "labelme_to_coco", "load_coco_json", "sample_generator",
    "sample_seed", "yolo_to_coco",
]
