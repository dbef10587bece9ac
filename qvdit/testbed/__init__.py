"""A small video DiT testbed: procedural clips, a trajectory checker, a small diffusers Wan model with
label conditioning, a flow-matching sampler, its training script and paired quality metrics.

Nothing here downloads anything: the data is drawn on the fly from a seed and the trained weights ship
in `qvdit/assets/`.
"""
from .data import DataConfig, all_labels, eval_labels, label_text, render
from .checker import check_clips

__all__ = ["DataConfig", "all_labels", "eval_labels", "label_text", "render", "check_clips"]
