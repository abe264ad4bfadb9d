"""VTAB-1K's 19 tasks: the standard order and the three groups (the one place that knows them)."""

from __future__ import annotations

VTAB1K_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": (
        "caltech101",
        "cifar",
        "dtd",
        "oxford_flowers102",
        "oxford_iiit_pet",
        "svhn",
        "sun397",
    ),
    "specialized": (
        "patch_camelyon",
        "eurosat",
        "resisc45",
        "diabetic_retinopathy",
    ),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}

VTAB1K_DATASETS: tuple[str, ...] = tuple(
    name for members in VTAB1K_GROUPS.values() for name in members
)
