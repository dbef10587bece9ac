"""backend="auto" for the GEMM from the measured per-GPU table (qvdit_kernels/auto.py, configs/auto.json)."""
import json

import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import auto, backends, reference

from conftest import DEVICE, KERNEL_BACKENDS, gen

H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
CUDA_DEV = torch.device("cuda", 0)


def test_table_is_well_formed():
    with open(auto.TABLE) as fh:
        table = json.load(fh)
    assert table["_doc"]
    for key, entry in table.items():
        if key.startswith("_"):
            continue
        for rule in entry["qgemm"]:
            assert set(rule["w_bits"]) <= {3, 4, 8} and rule["min_k"] >= 1
            assert rule["backend"] in ("triton", "cuda")
            assert isinstance(rule.get("tails", False), bool)


@pytest.mark.parametrize("w_bits,k,tail,name,want", [
    (3, 5120, False, H200, "cuda"),
    (4, 2048, False, H200, "cuda"),
    (3, 1536, False, H200, "cuda"),  # W3A6: CUDA measured faster at every K (run ws7, graph device time too)
    (4, 1536, False, H200, "cuda"),  # W4A8 at K = 1536: CUDA 1.00-1.02x of Triton after the ws10 epilogue
    (4, 1152, False, H200, None),   # W4A8 at K = 1152: Triton measured faster (CUDA 0.95-0.96x, ws10)
    (3, 5120, True, H200, "cuda"),  # W3 with a tail: CUDA + its one-pass tail beat Triton's fused tail (ws7)
    (4, 5120, True, H200, None),    # W4 with a tail: Triton's fused tail measured faster (ws7)
    (8, 5120, False, H200, None),   # W8: no rule (the warp-specialized kernel is W3/W4)
    (3, 5120, False, H100, None),   # not measured there: default order
])
def test_rules(w_bits, k, tail, name, want):
    assert auto.gemm_backend(CUDA_DEV, w_bits, k, tail, device_name=name) == want


def test_lookup_traces_as_a_constant(monkeypatch):
    """Under torch.compile(fullgraph=True) the table lookup (device name, cached table) is a constant."""
    monkeypatch.setattr(auto, "_device_name", lambda index: H200)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1.0 if auto.gemm_backend(CUDA_DEV, 3, 5120, False) == "cuda" else 0.0)

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]
    torch._dynamo.reset()


def test_cpu_tensors_take_no_rule():
    assert auto.gemm_backend(torch.device("cpu"), 3, 5120, False) is None


def test_rule_for_an_unavailable_backend_keeps_the_default(monkeypatch):
    """On a machine without the CUDA extension the table's "cuda" choice is ignored, not an error."""
    monkeypatch.setattr(auto, "gemm_backend", lambda *a, **k: "cuda")
    x = torch.randn(5, 300, generator=gen(0))
    q, sw, zw = qk.quantize_weight(torch.randn(7, 300, generator=gen(1)), 3)
    wp = qk.pack_weight(q, 3)
    y = qk.qlinear(x, wp, 3, sw, zw, 6, backend="auto")
    assert torch.equal(y, qk.qlinear(x, wp, 3, sw, zw, 6, backend="torch"))


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the Triton backend (GPU or TRITON_INTERPRET=1)")
def test_routed_qlinear_runs_the_named_backends_qlinear(monkeypatch):
    """When the table names a GEMM backend, qlinear(backend="auto") runs that backend's qlinear (its act-quant
    and its GEMM: the CUDA act-quant measured faster than Triton's too, run ws7), once, with the same result."""
    calls = []
    backends.resolve("qlinear", "triton", DEVICE)  # loads the Triton backend
    tri_linear = backends._IMPLS[("qlinear", "triton")]

    def spy(*a, **k):
        calls.append(a[2])
        return tri_linear(*a, **k)

    spy.fuses_tail = getattr(tri_linear, "fuses_tail", False)
    x = torch.randn(37, 300, generator=gen(2)).to(DEVICE)
    q, sw, zw = qk.quantize_weight(torch.randn(40, 300, generator=gen(3)), 4)
    wp, sw, zw = qk.pack_weight(q, 4).to(DEVICE), sw.to(DEVICE), zw.to(DEVICE)
    alpha, beta = (torch.randn(300, generator=gen(4)) * 0.1).to(DEVICE), torch.randn(40, generator=gen(5)).to(DEVICE)
    want = qk.qlinear(x, wp, 4, sw, zw, 8, alpha=alpha, beta=beta, backend="triton")
    monkeypatch.setattr(auto, "gemm_backend", lambda dev, w_bits, k, tail, device_name=None: "triton")
    monkeypatch.setitem(backends._IMPLS, ("qlinear", "triton"), spy)
    got = qk.qlinear(x, wp, 4, sw, zw, 8, alpha=alpha, beta=beta, backend="auto")
    assert calls == [4], "the routed backend's qlinear did not run (or ran more than once)"
    xq, sx, u, rs = reference.quantize_activation(x.cpu(), 8, alpha.cpu(), want_rowsum=True)
    ref = reference.qgemm(xq, sx, wp.cpu(), 4, sw.cpu(), zw.cpu(), None, u, beta.cpu(), rs, torch.float32)
    assert torch.allclose(got.float().cpu(), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-4)


def test_bench_cuda_suggests_the_rules_a_run_supports():
    """benchmarks/bench_cuda.py::suggest_rules on a synthetic run: W3 faster everywhere (tails too) -> every K with
    tails; W4 slower at small K -> min_k one above the slowest K; a kernel slower at the median -> no rule."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench_cuda import suggest_rules

    def rows_for(variant, speedups, modes=("gemm",)):  # speedups: K -> CUDA speed over Triton
        out = []
        for k, x in speedups.items():
            for mode in modes:
                base = dict(shape=f"s{k}", M=32760, K=k, N=1536, variant=variant, mode=mode)
                out += [dict(base, kernel="triton", ms=1.0), dict(base, kernel="cuda sm90ws", ms=1.0 / x)]
        return out

    rows = rows_for("W3A6", {1536: 1.05, 5120: 1.2}, ("gemm", "gemm+gelu", "gemm+res"))
    rows += rows_for("W4A8", {1152: 0.87, 1536: 0.94, 3072: 1.03, 5120: 0.97, 13824: 1.1})
    rows += rows_for("W8A8", {1536: 0.9, 5120: 0.99})
    rules, evidence = suggest_rules(rows)
    assert rules == [{"w_bits": [3], "min_k": 1, "backend": "cuda", "tails": True},
                     {"w_bits": [4], "min_k": 1537, "backend": "cuda"}]
    assert evidence["W8A8"]["verdict"].startswith("no rule")
    assert suggest_rules(rows, floor=0.98)[0][1]["min_k"] == 5121  # a stricter floor moves the threshold


def test_tail_as_own_pass_only_for_cuda():
    """Triton and the reference take the tail in the GEMM call (models/fused.py then keeps the FFN's GELU in fc1)."""
    cpu = torch.device("cpu")
    for backend in ("torch", "triton", "auto"):
        assert not qk.ops.tail_as_own_pass(backend, cpu, 3, 1536)
