"""QLinear, quantize_ and QuantConfig (qvdit/qlinear.py, quantize.py, config.py)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import qvdit
import qvdit_kernels as qk
from qvdit import QLinear, QuantConfig, quantize_

from conftest import gen


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


def quiet_quantize(model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "no frame adapter" warning of generic models
        return quantize_(model, config, **kw)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_w8a8_mlp_is_close_to_fp():
    model = mlp()
    x = torch.randn(50, 64, generator=gen(1))
    ref = model(x)
    q = quiet_quantize(copy.deepcopy(model), QuantConfig(w_bits=8, a_bits=8))
    assert isinstance(q[0], QLinear) and isinstance(q[2], QLinear)
    with torch.no_grad():
        err = rel_err(q(x), ref)
    assert err < 0.02, err  # measured 0.012: two 8-bit layers around a GELU


@pytest.mark.parametrize("w_bits,a_bits,bound", [(4, 8, 0.15), (3, 6, 0.35)])
def test_low_bit_mlp_error_is_bounded(w_bits, a_bits, bound):
    model = mlp()
    x = torch.randn(50, 64, generator=gen(2))
    q = quiet_quantize(copy.deepcopy(model), QuantConfig(w_bits=w_bits, a_bits=a_bits))
    with torch.no_grad():
        assert 0 < rel_err(q(x), model(x)) < bound


def test_forward_equals_the_op_and_dequantized_weight():
    lin = nn.Linear(200, 75)
    q = QLinear.from_linear(lin, QuantConfig(w_bits=3, a_bits=6, tqe=False))
    x = torch.randn(3, 5, 200, generator=gen(3))
    want = qk.qlinear(x, q.w_packed, 3, q.w_scale, q.w_zero, 6, bias=q.bias)
    assert torch.equal(q(x), want)
    codes, scale, zero = qk.quantize_weight(lin.weight.detach(), 3)
    assert torch.equal(q.dequantized_weight(), scale[:, None] * (codes.float() - zero[:, None]))


def test_uncalibrated_tqe_is_plain_rtn():
    """beta = 0 at init: TQE on gives exactly the RTN output (u * 0 adds nothing)."""
    lin = nn.Linear(64, 48)
    x = torch.randn(20, 64, generator=gen(4))
    on, off = (QLinear.from_linear(lin, QuantConfig(w_bits=4, a_bits=8, tqe=t)) for t in (True, False))
    assert on.alpha is not None and (on.beta == 0).all() and (on.gate == 1).all()
    assert torch.equal(on(x), off(x))
    with torch.no_grad():
        on.beta.fill_(0.5)
    assert not torch.equal(on(x), off(x))


def test_tqe_init_is_deterministic_per_layer():
    lin = nn.Linear(64, 48)
    a = QLinear.from_linear(lin, QuantConfig(seed=3), name="blocks.0.x")
    b = QLinear.from_linear(lin, QuantConfig(seed=3), name="blocks.0.x")
    c = QLinear.from_linear(lin, QuantConfig(seed=3), name="blocks.1.x")
    assert torch.equal(a.alpha, b.alpha) and not torch.equal(a.alpha, c.alpha)
    assert a.alpha.abs().max() <= 1 / 64**0.5


def test_callers_weights_are_not_mutated():
    model = mlp()
    w0 = model[0].weight
    before = w0.detach().clone()
    quiet_quantize(model, QuantConfig(w_bits=3, a_bits=6))
    assert torch.equal(w0.detach(), before)


def test_filter_fn_skip_and_overrides():
    model = mlp()
    quiet_quantize(model, QuantConfig(w_bits=4, a_bits=8, overrides={"2": {"w_bits": 8, "tqe": False}}),
                   filter_fn=lambda m, name: isinstance(m, nn.Linear))
    assert (model[0].w_bits, model[0].tqe) == (4, True) and (model[2].w_bits, model[2].tqe) == (8, False)
    model = mlp()
    quiet_quantize(model, QuantConfig(skip=("0",)))
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], QLinear)


def test_selected_non_linear_raises_with_its_name():
    model = mlp()
    with pytest.raises(TypeError, match=r"^1: selected for quantization but is a GELU"):
        quantize_(model, QuantConfig(), filter_fn=lambda m, name: name in ("0", "1"))
    assert isinstance(model[0], nn.Linear)  # checked before anything was replaced


def test_unsupported_layers_raise_with_their_names():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)

    with pytest.raises(TypeError, match="attn.out_proj"):
        quantize_(WithMHA(), QuantConfig())
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="^0: weight is on the meta device"):
        quantize_(meta, QuantConfig())
    with pytest.raises(ValueError, match="selected no nn.Linear"):
        quantize_(nn.Sequential(nn.GELU()), QuantConfig())
    with pytest.raises(ValueError, match="QLinear.from_linear"):
        quantize_(nn.Linear(4, 4), QuantConfig())


def test_generic_model_warns_about_frames():
    with pytest.warns(UserWarning, match="no qvdit frame adapter"):
        quantize_(mlp(), QuantConfig())


def test_weight_memory_accounting():
    model = nn.Sequential(nn.Linear(1536, 1536))
    quiet_quantize(model, QuantConfig(w_bits=3, a_bits=6))
    qb, bf = qvdit.weight_bytes(model)
    assert qb == model[0].nbytes()
    # packed 3-bit + f32 scale/zero/beta/bias + alpha + gate, vs bf16 weight + bias
    assert qb == 1536 * 1536 * 3 // 8 + 4 * (1536 * 4 + 1536) + 4 * 2
    assert qb / bf <= 0.21


def test_config_validation():
    with pytest.raises(ValueError, match="w_bits must be one of"):
        QuantConfig(w_bits=2)
    with pytest.raises(TypeError, match="w_bits must be an int"):
        QuantConfig(w_bits="4")
    with pytest.raises(ValueError, match="a_bits must be one of"):
        QuantConfig(a_bits=4)
    with pytest.raises(TypeError, match="tqe must be a bool"):
        QuantConfig(tqe=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantConfig(backend="gpu")
    with pytest.raises(TypeError, match="skip must be a tuple"):
        QuantConfig(skip="blocks.*")
    with pytest.raises(ValueError, match="unknown key 'bits'"):
        QuantConfig(overrides={"*": {"bits": 8}})
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(overrides={"*": {"w_bits": 5}})
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        quantize_(mlp(), {"w_bits": 4})
    c = QuantConfig(w_bits=3, a_bits=6, skip=["a"], overrides={"x*": {"a_bits": 8}})
    assert QuantConfig.from_json(c.to_json()) == c and c.skip == ("a",)


def test_qlinear_input_errors():
    q = QLinear.from_linear(nn.Linear(16, 8), QuantConfig())
    with pytest.raises(ValueError, match="input has 15 features"):
        q(torch.randn(2, 15))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.zeros(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        QLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = mlp().to(dtype)
    quiet_quantize(model, QuantConfig(w_bits=4, a_bits=8))
    y = model(torch.randn(5, 64).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
