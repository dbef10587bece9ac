"""torch.compile(fullgraph=True) of quantized transformer blocks and CUDA-graph capture (no graph breaks from qvdit).

The kernels reach the graph as torch.library custom ops of the "triton" backend (`qvdit_kernels/triton/library.py`);
the frame ids are built by the adapter's pre-hook outside the compiled blocks, so a block only reads them. The
pure-torch reference backend is not a compile target (its non-finite-row handling branches on data). On CPU these
tests run where the Triton kernels do, under TRITON_INTERPRET=1 (as CI runs), with the aot_eager backend.
"""
import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import qvdit
from qvdit import QuantConfig, quantize_
from qvdit.models import find_adapter
from qvdit_kernels import backends

from conftest import DEVICE, capture_cuda_graph, requires_gpu
from test_adapters import tiny_wan

needs_triton = pytest.mark.skipif(not backends.availability("triton", DEVICE)[0],
                                  reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def calibrated_wan(dtype=torch.float32):
    """Tiny Wan (2 blocks: enough to show one graph serving both) at W4A8 on the Triton backend, with per-frame
    gates and nonzero beta (so a wrong id shows)."""
    model = quantize_(tiny_wan(num_layers=2).to(DEVICE, dtype), QuantConfig(w_bits=4, a_bits=8, backend="triton"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in qvdit.qlinears(model).values():
            q.beta.copy_(torch.randn(q.out_features, generator=g))
            q.gate = nn.Parameter(torch.tensor([0.5, 2.0, 1.0, 1.0], device=DEVICE), requires_grad=False)
    return model


def inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 6, generator=g).to(DEVICE, dtype),
                timestep=torch.tensor([10], device=DEVICE),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=g).to(DEVICE, dtype))


def forward(model, kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@needs_triton
@pytest.mark.parametrize("fuse", ["0", "1"])
def test_compiled_blocks_fullgraph_match_eager_and_do_not_recompile(monkeypatch, fuse):
    # the same block forward compiled and eager, with the fusion of qvdit.models.fused off and on: bit for bit
    monkeypatch.setenv("QVDIT_FUSE_PRODUCERS", fuse)
    torch._dynamo.reset()
    model = calibrated_wan()
    compiled = copy.deepcopy(model)
    compiled.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    counters.clear()
    assert torch.equal(forward(compiled, inputs(1)), forward(model, inputs(1)))
    # one graph serves both blocks: nothing per layer (its name, its ids) is specialized on
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.compiler.set_stance("fail_on_recompile")  # a new forward (new ids tensor, same shapes): no recompile
    try:
        assert torch.equal(forward(compiled, inputs(2)), forward(model, inputs(2)))
    finally:
        torch.compiler.set_stance("default")


@requires_gpu
@needs_triton
def test_inductor_compiled_blocks_close_to_eager():
    torch._dynamo.reset()
    model = calibrated_wan(torch.bfloat16)
    compiled = copy.deepcopy(model)
    compiled.compile_repeated_blocks(fullgraph=True)
    y, ref = forward(compiled, inputs(3, torch.bfloat16)).float(), forward(model, inputs(3, torch.bfloat16)).float()
    # inductor fuses the bf16 norms/modulation around the opaque qvdit ops: rounding differs, codes may flip
    assert float((y - ref).norm() / ref.norm()) < 2e-2


@requires_gpu
@needs_triton
def test_cuda_graph_capture_of_a_quantized_block():
    model = calibrated_wan(torch.bfloat16)
    block = model.blocks[0]
    got = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: got.update(args=a, kwargs=k), with_kwargs=True)
    kw = inputs(4, torch.bfloat16)
    forward(model, kw)  # records the block's inputs; also picks the kernels' launch configs before capture
    hook.remove()
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in got["args"]]
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in got["kwargs"].items()}
    find_adapter(model)._publish_hook(model, (), kw)  # the ids the block reads, as a forward would publish them

    def run():
        with torch.no_grad():
            return block(*args, **kwargs)

    eager = run()
    graph, out = capture_cuda_graph(run)
    args[0].normal_()  # a new input in the captured buffer: the replay must follow it
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())
    assert not torch.equal(out, eager)
    model._qvdit_frames.clear()
