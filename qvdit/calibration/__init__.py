"""Q-VDiT calibration: fake quantization with straight-through gradients on the reference quantizer math,
Eq. 9 gate initialisation, the TMD loss, the end-to-end calibration loop and deployment to QLinear."""
from .calibrate import RECIPES, Recipe, calibrate, collect_items, fp_targets
from .deploy import deploy_, to_qlinear
from .fakequant import FakeQuantLinear, fake_quant_act, fake_quant_weight
from .tmd import tmd_loss
from .tqe_init import eq9_gate, init_gates

__all__ = ["RECIPES", "Recipe", "calibrate", "collect_items", "fp_targets", "deploy_", "to_qlinear",
           "FakeQuantLinear", "fake_quant_act", "fake_quant_weight", "tmd_loss", "eq9_gate", "init_gates"]
