"""Producer fusion on diffusers' Wan block (qvdit/models/fused.py, wan.py::wan_block_forward): the norm +
modulation + act-quant of q/k/v, cross-attention q and the FFN input in one `norm_quantize` pass.

On the reference backend the fused forward equals the unfused one bit for bit (same torch ops for y, same
codes and float64 u), which also checks that `wan_block_forward` mirrors diffusers' block. On Triton (GPU, or
the interpreter) it is checked against the unfused Triton forward within a small relative error."""
import copy
import re

import pytest
import torch

import qvdit_kernels as qk
from qvdit import QLinear, QuantConfig, quantize_
from qvdit.models import fused

from conftest import DEVICE, KERNEL_BACKENDS

pytest.importorskip("diffusers")


def tiny_wan(per_token=False):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
                                 cross_attn_norm=True, rope_max_seq_len=32).eval()


def quantized(backend, device):
    model = quantize_(tiny_wan().to(device), QuantConfig(w_bits=4, a_bits=8, backend=backend))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # TQE terms that matter: beta != 0, per-frame gates != 1
        for q in model.modules():
            if isinstance(q, QLinear):
                q.beta.copy_(torch.randn(q.beta.shape, generator=g).to(device) * 0.1)
                q.gate.copy_((torch.rand(q.gate.shape, generator=g) + 0.5).to(device))
    return model


def inputs(device):
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 6, generator=g).to(device), timestep=torch.tensor([10, 20]).to(device),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g).to(device))


WRITE_Y = []  # write_y of every norm_quantize / add_norm_quantize call of the last `run`
TAILS = []  # (input_activation, activation, residual given, gate given) of every fused qgemm/qlinear call of `run`


def run(model, kw, fuse, monkeypatch):
    calls = []

    def counting(real, adds):
        def op(*a, **k):
            calls.append(k.get("write_y", True))
            if adds:
                TAILS.append(("norm", None, True, k.get("residual_gate") is not None))
            return real(*a, **k)
        return op

    def recording(real_op):
        def op(*a, **k):
            if any(k.get(n) is not None for n in ("input_activation", "activation", "residual")):
                TAILS.append((k.get("input_activation"), k.get("activation"), k.get("residual") is not None,
                              k.get("residual_gate") is not None))
            return real_op(*a, **k)
        return op

    TAILS.clear()
    monkeypatch.setattr(fused.qk, "norm_quantize", counting(qk.norm_quantize, False))
    monkeypatch.setattr(fused.qk, "add_norm_quantize", counting(qk.add_norm_quantize, True))
    monkeypatch.setattr(qk, "qgemm", recording(qk.qgemm))
    monkeypatch.setattr(qk, "qlinear", recording(qk.qlinear))
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "1" if fuse else "0")
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    monkeypatch.undo()
    WRITE_Y[:] = calls
    return out, len(calls)


# per block: fc1 + GELU; attn1's o-proj with its gated residual; attn2's o-proj, plain residual; fc2, gated
BLOCK_TAILS = [(None, "gelu_tanh", False, False), (None, None, True, True), (None, None, True, False),
               (None, None, True, True)]
# the same where the GEMMs would run their tails as passes of their own (CUDA): fc2 quantizes the GELU of fc1's
# output, and the residual adds after the attentions go into the next norm's pass ("norm": add_norm_quantize)
BLOCK_TAILS_CUDA = [("norm", None, True, True), ("norm", None, True, False), ("gelu_tanh", None, True, True)]


def test_reference_fused_equals_unfused_bit_for_bit(monkeypatch):
    model, kw = quantized("torch", torch.device("cpu")), inputs(torch.device("cpu"))
    plain, n0 = run(model, kw, False, monkeypatch)
    fused_out, n1 = run(model, kw, True, monkeypatch)
    assert n0 == 0 and n1 == 3 * 2  # three norm sites in each of the two blocks
    assert sorted(TAILS, key=str) == sorted(BLOCK_TAILS * 2, key=str)  # GELU and the three residual adds in epilogues
    assert torch.equal(plain, fused_out)
    assert all(q._prequant is None and q._residual is None
               for q in model.modules() if isinstance(q, QLinear))  # every handoff consumed
    assert WRITE_Y == [False] * 6  # diffusers' Wan processors and FFN read the norms' y only through the linears
    monkeypatch.setenv("QVDIT_CODES_ONLY", "0")
    again, _ = run(model, kw, True, monkeypatch)
    assert WRITE_Y == [True] * 6 and torch.equal(again, plain)


def test_codes_only_needs_a_known_reader(monkeypatch):
    """A processor this package does not know (here a subclass of diffusers' own) may read hidden_states itself:
    the norms in front of it write y. And one that skips a projection the norm left codes for raises."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Mine(WanAttnProcessor):
        pass

    model, kw = quantized("torch", torch.device("cpu")), inputs(torch.device("cpu"))
    plain, _ = run(model, kw, False, monkeypatch)
    for block in model.blocks:
        block.attn1.set_processor(Mine())
    out, _ = run(model, kw, True, monkeypatch)
    assert WRITE_Y == [True, False, False] * 2 and torch.equal(out, plain)

    class Skipping(WanAttnProcessor):  # calls no projection on hidden_states
        def __call__(self, attn, hidden_states, *a, **k):
            return torch.zeros_like(hidden_states)

    model.blocks[0].attn2.processor = Skipping()
    model.blocks[0].attn2.processor.__class__.__module__ = "diffusers.fake"  # (passes for diffusers' own)
    type(model.blocks[0].attn2.processor).__name__ = "WanAttnProcessor"
    with pytest.raises(RuntimeError, match="QVDIT_CODES_ONLY=0"):
        run(model, kw, True, monkeypatch)


def test_reference_gelu_in_fc2_equals_unfused_bit_for_bit(monkeypatch):
    """Where the GEMMs would run their tails as passes of their own (the CUDA kernel; ops.tail_as_own_pass), the
    GELU moves into fc2's act-quant (qlinear(input_activation=)) and the residual adds after the attentions into
    the next norm's pass (add_norm_quantize): still the unfused block's result bit for bit."""
    model, kw = quantized("torch", torch.device("cpu")), inputs(torch.device("cpu"))
    plain, _ = run(model, kw, False, monkeypatch)
    monkeypatch.setattr(qk.ops, "tail_as_own_pass", lambda *a: True)
    out, n = run(model, kw, True, monkeypatch)  # (run undoes the monkeypatches when it ends)
    assert n == 3 * 2 and sorted(TAILS, key=str) == sorted(BLOCK_TAILS_CUDA * 2, key=str)
    assert torch.equal(plain, out)
    assert all(q._prequant is None and q._residual is None for q in model.modules() if isinstance(q, QLinear))


@pytest.fixture(scope="module")
def triton_fused_eager():
    """The eager fused forward of quantized("triton") on inputs(DEVICE), once for the tests that compare with it
    (interpreted on CPU it is the slow part): (output, norm_quantize calls, the tails it fused)."""
    with pytest.MonkeyPatch.context() as mp:
        out, n = run(quantized("triton", DEVICE), inputs(DEVICE), True, mp)
    return out, n, list(TAILS)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton runs on a GPU or under TRITON_INTERPRET=1")
def test_triton_fused_close_to_unfused(monkeypatch, triton_fused_eager):
    model, kw = quantized("triton", DEVICE), inputs(DEVICE)
    plain, _ = run(model, kw, False, monkeypatch)
    fused_out, n, tails = triton_fused_eager
    assert n == 6 and sorted(tails, key=str) == sorted(BLOCK_TAILS * 2, key=str)
    err = ((fused_out - plain).norm() / plain.norm()).item()
    assert err < 2e-3, err  # y may differ from torch's LayerNorm by float rounding, u by its summation order


def test_not_fused_when_a_consumer_is_not_quantized(monkeypatch):
    """q/k/v of block 0 left in full precision (skip): that site runs the plain expression, the others fuse."""
    model = quantize_(tiny_wan(), QuantConfig(w_bits=4, a_bits=8, backend="torch", skip=("blocks.0.attn1.to_k",)))
    ref = copy.deepcopy(model)
    a, n = run(model, inputs(torch.device("cpu")), True, monkeypatch)
    b, _ = run(ref, inputs(torch.device("cpu")), False, monkeypatch)
    assert n == 5 and torch.equal(a, b)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton runs on a GPU or under TRITON_INTERPRET=1")
def test_compiled_blocks_run_the_fused_forward(monkeypatch, triton_fused_eager):
    """`compile_repeated_blocks(fullgraph=True)`: the fused kernels are custom ops and the handoffs are side
    effects within one block, so each block traces whole, runs norm_quantize and the epilogue tails, and gives
    the eager fused result bit for bit (aot_eager: the traced graph, run op by op); no handoff is left over."""
    model, kw = quantized("triton", DEVICE), inputs(DEVICE)
    eager = triton_fused_eager[0]
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    out, n = run(model, kw, True, monkeypatch)
    assert n == 6 and sorted(TAILS, key=str) == sorted(BLOCK_TAILS * 2, key=str)  # traced calls of the fusion
    assert torch.equal(out, eager)
    assert all(q._prequant is None and q._residual is None for q in model.modules() if isinstance(q, QLinear))
    torch._dynamo.reset()


def test_norm_backend_per_consumer_backend(monkeypatch):
    """CUDA QLinears are fed by CUDA's norm_quantize (csrc/norm_quant.cu) where the extension is built, else by
    Triton's (the same codes, scales, u and row sums); every other backend by its own; QVDIT_NORM_BACKEND forces
    one kernel and rejects anything but triton or cuda."""
    cpu = torch.device("cpu")
    triton = "triton" if "triton" in KERNEL_BACKENDS else None
    assert fused.norm_backend("cuda", DEVICE) == ("cuda" if "cuda" in KERNEL_BACKENDS else triton)
    assert fused.norm_backend("torch", cpu) == "torch"
    assert fused.norm_backend("triton", DEVICE) == triton
    monkeypatch.setenv("QVDIT_NORM_BACKEND", "triton")
    assert fused.norm_backend("cuda", DEVICE) == triton and fused.norm_backend("auto", DEVICE) == triton
    monkeypatch.setenv("QVDIT_NORM_BACKEND", "cuBLAS")
    with pytest.raises(ValueError, match="QVDIT_NORM_BACKEND must be"):
        fused.norm_backend("auto", DEVICE)


def test_handoff_is_used_once_and_only_for_its_tensor():
    """QLinear takes a producer's codes for the tensor they were made for (here deliberately another input's
    codes, so using them shows), once; a handoff for another tensor is dropped and x is quantized itself."""
    q = QLinear.from_linear(torch.nn.Linear(16, 8), QuantConfig(w_bits=4, a_bits=8, tqe=False, backend="torch"))
    x, other = torch.randn(3, 16), torch.randn(3, 16)
    want_x, want_other = q(x), q(other)
    xq, sx, _, rs = qk.quantize_activation_rowsum(other, 8, backend="torch")
    q._prequant = (x, xq, sx, rs, None, True)
    assert torch.equal(q(x), want_other) and q._prequant is None  # used, and consumed
    assert torch.equal(q(x), want_x)  # the next call quantizes x itself
    q._prequant = (other, xq, sx, rs, None, True)
    assert torch.equal(q(x), want_x) and q._prequant is None  # stale: dropped
    # a handoff whose y the norm did not write (feed(codes_only=True)): the layer called on another tensor raises,
    # so the stand-in never reaches a computation silently; so does a model's processor that skips the layer
    q._prequant = (other, xq, sx, rs, None, False)
    with pytest.raises(RuntimeError, match="without writing its output"):
        q(x)
    q._prequant = (other, xq, sx, rs, None, False)
    with pytest.raises(RuntimeError, match="QVDIT_CODES_ONLY=0"):
        fused.check_consumed([q])
    assert q._prequant is None
    # a call that raises before its layer took the handoff (an OOM in the processor) drops it: the layer's next call
    # on another tensor quantizes that tensor
    q._prequant = (other, xq, sx, rs, None, False)
    with pytest.raises(MemoryError):
        fused.consuming(lambda: (_ for _ in ()).throw(MemoryError()), [q, None])
    assert q._prequant is None and torch.equal(q(x), want_x)
    q._prequant = (x, xq, sx, rs, None, False)
    assert torch.equal(fused.consuming(lambda: q(x), [q]), want_other) and q._prequant is None


def test_per_token_modulation_fused_equals_unfused(monkeypatch):
    """Wan 2.2 TI2V style: a timestep per token gives temb (B, S, 6, C), so the modulation is per row."""
    model, kw = quantized("torch", torch.device("cpu")), inputs(torch.device("cpu"))
    tokens = 3 * (8 // 2) * (6 // 2)
    kw["timestep"] = torch.randint(0, 1000, (2, tokens), generator=torch.Generator().manual_seed(3))
    plain, _ = run(model, kw, False, monkeypatch)
    fused_out, n = run(model, kw, True, monkeypatch)
    assert n == 6 and sorted(TAILS, key=str) == sorted(BLOCK_TAILS * 2, key=str) and torch.equal(plain, fused_out)


def _mutated_buffers(code: str, start: int, positions) -> list[str]:
    """The buffers named by the top-level arguments at `positions` of the call whose arguments begin at code[start]
    (inductor's output code: `bufN`, `argN_1` or `reinterpret_tensor(bufN, ...)`)."""
    args, depth, cur = [], 0, ""
    for ch in code[start:]:
        if depth == 0 and ch in ",)":
            args.append(cur.strip())
            cur = ""
            if ch == ")":
                break
            continue
        depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        cur += ch
    return [re.search(r"\b((?:buf|arg)\w+)", args[i]).group(1) for i in positions]


def test_mutated_buffers_reads_nested_arguments():
    code = "f(reinterpret_tensor(buf3, (4, 8), (16, 1), 0), 6, None, buf9, arg2_1)"
    assert _mutated_buffers(code, 2, (0, 3, 4)) == ["buf3", "buf9", "arg2_1"]


@pytest.mark.parametrize("env,expect", [({}, (True, True)), ({"QVDIT_FFN_OVER": "0"}, (True, False)),
                                        ({"QVDIT_FFN_INPLACE": "0"}, (False, False))])
def test_fc2_takes_over_fc1_output_where_fc1_fused_the_gelu(monkeypatch, env, expect):
    """Where fc1's GEMM fuses the GELU (here the torch reference; Triton likewise), fc1's output is as dead after
    fc2 as where fc2 applies the GELU, so fc2 is given it and the block's residual to overwrite
    (`qlinear(overwrite_input=, overwrite_residual=)`): a backend that can (CUDA: with QVDIT_CUDA_FUSED_TAIL=1, or a
    CUDA fc2 beside a Triton fc1) then keeps no int8 copy of fc1's output and no output buffer beside it.
    QVDIT_FFN_OVER=0 and QVDIT_FFN_INPLACE=0 take that back."""
    model, kw = quantized("torch", torch.device("cpu")), inputs(torch.device("cpu"))
    ffn_dim = model.blocks[0].ffn.net[2].in_features
    seen, real = [], qk.qlinear

    def spy(x, *a, **k):
        if x.shape[-1] == ffn_dim:  # fc2
            seen.append((k.get("input_activation"), k.get("overwrite_input"), k.get("overwrite_residual")))
        return real(x, *a, **k)

    monkeypatch.setattr(qk, "qlinear", spy)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "1")
    with torch.no_grad():
        model(**kw, return_dict=False)
    assert seen == [(None, *expect)] * len(model.blocks)


@pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="needs a GPU and the built CUDA extension")
def test_cuda_fc2_quantizes_over_fc1_output_eager_and_compiled(monkeypatch):
    """On CUDA fc2 quantizes the GELU of fc1's output and writes the codes over it, its output into the rest of
    fc1's rows and the residual add over the block's residual (`qlinear(overwrite_input=True,
    overwrite_residual=True)`, cuda_qlinear_over, once per block): the eager and the inductor-compiled fused forwards
    agree with the unfused one (float rounding: inductor's own norms, u's summation order), and inductor's code
    calls the op on fc1's own buffer and the residual's, never on clones of them (which would bring back the
    [M, 4C] and [M, C] buffers the op exists to avoid)."""
    from torch._inductor.utils import run_and_get_code

    from qvdit_kernels import cuda as qcuda

    dev = torch.device("cuda")
    model, kw = quantized("cuda", dev), inputs(dev)
    plain, _ = run(model, kw, False, monkeypatch)
    taken = []
    monkeypatch.setenv("QVDIT_FFN_INPLACE", "1")  # (the default; set in case the environment turns it off)
    real_ok = qcuda.over_ok  # (True: cuda_qlinear_over runs, the codes, output and residual add over the buffers)
    monkeypatch.setattr(qcuda, "over_ok", lambda *a: taken.append(real_ok(*a)) or taken[-1])
    eager, n = run(model, kw, True, monkeypatch)
    assert n == 6 and taken == [True, True]  # (run() undoes the spy: the compiled run below is not counted)
    rel_err = lambda out: ((out - plain).norm() / plain.norm()).item()  # noqa: E731
    assert rel_err(eager) < 2e-3, rel_err(eager)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True)
    monkeypatch.setenv("QVDIT_FFN_INPLACE", "1")
    (compiled, _), codes = run_and_get_code(run, model, kw, True, monkeypatch)
    assert rel_err(compiled) < 2e-3, rel_err(compiled)
    calls = [(code, buf) for code in codes for m in re.finditer(r"cuda_qlinear_over\.default\(", code)
             for buf in _mutated_buffers(code, m.end(), (0, 14))]
    assert calls, "inductor's code has no cuda_qlinear_over call"
    for code, buf in calls:  # (a clone shows as a copy/clone kernel or op writing or reading that buffer)
        cloned = [ln for ln in code.splitlines() if re.search(r"clone|copy_", ln) and re.search(rf"\b{buf}\b", ln)]
        assert not cloned, cloned
    torch._dynamo.reset()


@pytest.mark.skipif(not {"cuda", "triton"} <= set(KERNEL_BACKENDS), reason="needs a GPU, Triton and the CUDA extension")
def test_cuda_fc2_over_a_triton_fc1_output_eager_and_compiled(monkeypatch):
    """fc1 on Triton (it fuses the GELU), fc2 on CUDA (set by hand: a mixed routing): fc2 quantizes over fc1's output,
    its output into the rest of those rows and the residual add over the block's residual (cuda_qlinear_over, once
    per block); eager and inductor-compiled agree with the unfused forward."""
    from qvdit_kernels import cuda as qcuda

    dev = torch.device("cuda")
    model, kw = quantized("cuda", dev), inputs(dev)
    for block in model.blocks:
        block.ffn.net[0].proj.backend = "triton"
    plain, _ = run(model, kw, False, monkeypatch)
    taken = []
    real_ok = qcuda.over_ok
    monkeypatch.setattr(qcuda, "over_ok", lambda *a: taken.append(real_ok(*a)) or taken[-1])
    eager, _ = run(model, kw, True, monkeypatch)
    assert taken == [True, True]
    assert ("gelu_tanh" in [t[1] for t in TAILS]) and ("gelu_tanh" not in [t[0] for t in TAILS])  # GELU in fc1
    rel_err = lambda out: ((out - plain).norm() / plain.norm()).item()  # noqa: E731
    assert rel_err(eager) < 2e-3, rel_err(eager)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True)
    compiled, _ = run(model, kw, True, monkeypatch)
    assert rel_err(compiled) < 2e-3, rel_err(compiled)
    torch._dynamo.reset()


def _ffn_family(family):
    from test_adapters import tiny_cogvideox, tiny_latte

    g = torch.Generator().manual_seed(3)
    if family == "cogvideox":
        return tiny_cogvideox(), dict(hidden_states=torch.randn(2, 4, 4, 8, 8, generator=g),
                                      encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                                      timestep=torch.tensor([3, 7]))
    return tiny_latte(frames=3), dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g),
                                      encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                                      timestep=torch.tensor([3, 7]))


def _compile_blocks(model, **kw):
    """Each block of CogVideoX's / Latte's block lists compiled whole (fullgraph=True: a graph break raises)."""
    for name in ("transformer_blocks", "temporal_transformer_blocks"):
        for block in getattr(model, name, []):
            block.compile(fullgraph=True, **kw)


@pytest.mark.parametrize("gelu_in_fc2", [False, True])
@pytest.mark.parametrize("family", ["cogvideox", "latte"])
def test_ffn_forward_gives_fc1_output_to_fc2(monkeypatch, family, gelu_in_fc2):
    """CogVideoX's and Latte's FeedForwards run `fused.ffn_forward`, one call pair per FFN: the GELU in fc1's epilogue
    where its GEMM fuses tails (the torch reference), else (`tail_as_own_pass`, the CUDA GEMM; forced here) in fc2's
    act-quant, and fc2 may write its codes over fc1's output (`overwrite_input`). That output is dead: NaN written
    over it after fc2's call changes nothing. The result equals diffusers' own FFN (QVDIT_FUSE_PRODUCERS=0) within
    float rounding of the GELU."""
    model, kw = _ffn_family(family)
    model = quantize_(model, QuantConfig(w_bits=4, a_bits=8, backend="torch"))
    ffns = [m for m in model.modules() if type(m).__name__ == "FeedForward"]
    seen, real = [], qk.qlinear

    def spy(x, *a, **k):
        seen.append((x.shape[-1], k.get("activation"), k.get("input_activation"), k.get("overwrite_input")))
        out = real(x, *a, **k)
        if k.get("overwrite_input"):
            x.fill_(float("nan"))  # (what a backend that takes x over may leave there)
        return out

    monkeypatch.setattr(qk, "qlinear", spy)
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "0")
    with torch.no_grad():
        plain = model(**kw, return_dict=False)[0]
    assert not any(s[3] for s in seen)
    seen.clear()
    if gelu_in_fc2:
        monkeypatch.setattr(qk.ops, "tail_as_own_pass", lambda *a: True)
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "1")
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    inner = ffns[0].net[2].in_features
    fc1 = [s for s in seen if s[0] != inner and s[1] == "gelu_tanh" and not s[3]]
    fc2 = [s for s in seen if s[0] == inner]
    assert len(fc2) == len(ffns) >= 1
    assert all(s[2] == ("gelu_tanh" if gelu_in_fc2 else None) and s[3] is True for s in fc2)
    if not gelu_in_fc2:
        assert len(fc1) == len(ffns)
    assert torch.isfinite(out).all()
    err = ((out - plain).norm() / plain.norm()).item()
    assert err < 1e-5, err


def test_ffn_forward_reinstalls_over_a_class_forward():
    """Unpickling a module whose instance forward was replaced leaves the class's forward bound on the instance
    (pickle stores a bound method by name): install_ffn_forward puts the fused one back; a forward of another kind
    set on the instance is left alone."""
    import types

    model, _ = _ffn_family("cogvideox")
    ff = model.transformer_blocks[0].ff
    ff.forward = types.MethodType(type(ff).forward, ff)
    fused.install_ffn_forward(model)
    assert ff.forward.__func__ is fused._ffn_forward_of(type(ff).forward)
    own = lambda x: x  # noqa: E731
    ff.forward = own
    fused.install_ffn_forward(model)
    assert ff.forward is own


@pytest.mark.parametrize("family", ["cogvideox", "latte"])
def test_ffn_forward_compiled_blocks_equal_eager(monkeypatch, family):
    """Blocks compiled with fullgraph=True trace `ffn_forward` (the FFN's instance forward) with no graph break, and
    give the eager fused output bit for bit (aot_eager: the traced graph, run op by op)."""
    model, kw = _ffn_family(family)
    model = quantize_(model.to(DEVICE), QuantConfig(w_bits=3, a_bits=6, backend="triton"))
    kw = {k: v.to(DEVICE) for k, v in kw.items()}
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "1")
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0]
    torch._dynamo.reset()
    _compile_blocks(model, backend="aot_eager")
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    torch._dynamo.reset()
    assert torch.equal(out, eager)


@pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="needs a GPU and the built CUDA extension")
@pytest.mark.parametrize("family", ["cogvideox", "latte"])
def test_cuda_ffn_forward_eager_and_compiled(monkeypatch, family):
    """On CUDA fc2 quantizes the GELU of fc1's output over it (`cuda_act_quant_inplace`, once per FFN); eager and
    inductor-compiled agree with diffusers' own FFN."""
    from qvdit_kernels import cuda as qcuda

    dev = torch.device("cuda")
    model, kw = _ffn_family(family)
    model = quantize_(model.to(dev), QuantConfig(w_bits=3, a_bits=6, backend="cuda"))
    kw = {k: v.to(dev) for k, v in kw.items()}
    nffn = sum(type(m).__name__ == "FeedForward" for m in model.modules())
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "0")
    with torch.no_grad():
        plain = model(**kw, return_dict=False)[0]
    taken = []
    real_ok = qcuda.inplace_ok
    monkeypatch.setattr(qcuda, "inplace_ok", lambda *a: taken.append(real_ok(*a)) or taken[-1])
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", "1")
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0]
    assert taken == [True] * nffn
    rel_err = lambda out: ((out - plain).norm() / plain.norm()).item()  # noqa: E731
    assert rel_err(eager) < 2e-3, rel_err(eager)
    torch._dynamo.reset()
    _compile_blocks(model)
    with torch.no_grad():
        compiled = model(**kw, return_dict=False)[0]
    assert rel_err(compiled) < 2e-3, rel_err(compiled)
    torch._dynamo.reset()
