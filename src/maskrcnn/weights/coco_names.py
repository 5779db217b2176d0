"""COCO category names and ids, in the layouts that pretrained checkpoints use.

COCO 2017 has 80 categories whose official ids run from 1 to 90 with ten gaps (12, 26, 29, 30, 45, 66, 68,
69, 71, 83: categories that were dropped from the released annotations). Checkpoints index them in two ways:

- torchvision: 91 classifier outputs, index = COCO category id, index 0 is background and the gaps are
  ``"N/A"`` placeholders (:data:`COCO_V1_CATEGORIES`, :data:`TORCHVISION_COCO_CLASS_NAMES`).
- detectron2: 80 contiguous classes in ascending id order (:data:`COCO_CLASS_NAMES`,
  :data:`CONTIGUOUS_TO_COCO_ID`).
"""

from __future__ import annotations

# (id, name, supercategory) exactly as in instances_val2017.json.
_COCO_2017: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)

NUM_COCO_CLASSES = 80
MAX_COCO_CATEGORY_ID = 90
# Name torchvision gives to the unused ids in its 91-entry table.
NOT_AVAILABLE = "N/A"
BACKGROUND = "__background__"

#: ``{"id", "name", "supercategory"}`` records, as in the ``categories`` list of a COCO annotation file.
COCO_CATEGORIES: tuple[dict[str, object], ...] = tuple(
    {"id": cid, "name": name, "supercategory": sup} for cid, name, sup in _COCO_2017
)

#: Category name -> official COCO category id (1..90, with gaps).
COCO_CATEGORY_IDS: dict[str, int] = {name: cid for cid, name, _ in _COCO_2017}

#: Official COCO category id -> category name (80 entries).
COCO_ID_TO_NAME: dict[int, str] = {cid: name for cid, name, _ in _COCO_2017}

#: The 80 names in ascending id order: detectron2's contiguous class i (0-based) -> ``COCO_CLASS_NAMES[i]``.
COCO_CLASS_NAMES: tuple[str, ...] = tuple(name for _, name, _ in _COCO_2017)

#: detectron2's contiguous class index (0..79) -> official COCO category id.
CONTIGUOUS_TO_COCO_ID: tuple[int, ...] = tuple(cid for cid, _, _ in _COCO_2017)

#: torchvision's ``_COCO_CATEGORIES``: 91 entries, index = category id, 0 is background, gaps are "N/A".
COCO_V1_CATEGORIES: tuple[str, ...] = (BACKGROUND,) + tuple(
    COCO_ID_TO_NAME.get(i, NOT_AVAILABLE) for i in range(1, MAX_COCO_CATEGORY_ID + 1)
)

#: The 90 foreground entries of torchvision COCO models: label i -> ``TORCHVISION_COCO_CLASS_NAMES[i - 1]``.
#: Label i is also the COCO category id; the ten "N/A" entries are never predicted by a trained model.
TORCHVISION_COCO_CLASS_NAMES: tuple[str, ...] = COCO_V1_CATEGORIES[1:]

assert len(COCO_CLASS_NAMES) == NUM_COCO_CLASSES
assert len(COCO_V1_CATEGORIES) == MAX_COCO_CATEGORY_ID + 1
