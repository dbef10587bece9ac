"""Backend registry and dispatch (qvdit_kernels/backends.py)."""
import pytest
import torch

import qvdit_kernels as qk
from qvdit_kernels import backends


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.quantize_activation(torch.randn(2, 4), 8, backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.qgemm(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), torch.zeros(3, 4, dtype=torch.int8), 8,
                 torch.ones(3), torch.zeros(3), backend=None)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(qk.BackendUnavailableError, match="backend='cuda'"):
        qk.quantize_activation(torch.randn(2, 4), 8, backend="cuda")


def test_offline_ops_run_their_reference_in_any_named_backend():
    w = torch.randn(6, 40)
    ref = qk.quantize_weight(w, 4, backend="torch")
    for name in ("triton", "cuda", "auto"):
        got = qk.quantize_weight(w, 4, backend=name)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert torch.equal(qk.pack_weight(ref[0], 4, backend=name), qk.pack_weight(ref[0], 4))


def test_auto_on_cpu_is_the_reference():
    assert backends.resolve("qgemm", "auto", torch.device("cpu")) is backends.resolve("qgemm", "torch", torch.device("cpu"))


def test_registry_rejects_unknown_backend_names():
    with pytest.raises(ValueError, match="backend must be"):
        backends.register("qgemm", "auto")


def test_missing_kernel_in_an_available_backend(monkeypatch):
    """A backend that imports fine but has no kernel for an online op raises, naming the op."""
    monkeypatch.setitem(backends._LOADED, "cuda", (True, ""))
    with pytest.raises(qk.BackendUnavailableError, match="CUDA kernels need CUDA tensors"):
        qk.quantize_activation(torch.randn(2, 4), 8, backend="cuda")
    monkeypatch.setattr(backends, "availability", lambda name, dev: (True, ""))
    monkeypatch.delitem(backends._IMPLS, ("quantize_activation", "cuda"), raising=False)
    with pytest.raises(qk.BackendUnavailableError, match="no kernel for quantize_activation"):
        qk.quantize_activation(torch.randn(2, 4), 8, backend="cuda")


@pytest.mark.parametrize("capability,want", [((9, 0), "cuda"), ((8, 9), "cuda"), ((8, 0), "cuda"),
                                             ((10, 0), "triton"), ((12, 0), "triton"), ((7, 5), "triton")])
def test_auto_takes_the_cuda_norm_kernel_only_where_the_build_has_machine_code(monkeypatch, capability, want):
    """backends.AUTO_ORDER puts CUDA first for norm_quantize, but only on GPUs the default build (sm_80 + sm_90a
    machine code, no PTX) runs on, and for the act-quant only on Hopper (where it was measured); elsewhere "auto"
    keeps Triton first. Other ops keep Triton first everywhere."""
    dev = torch.device("cuda")
    monkeypatch.setattr(backends, "availability", lambda name, device: (True, ""))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for name in ("triton", "cuda"):
        for op in ("norm_quantize", "quantize_activation", "qgemm"):
            monkeypatch.setitem(backends._IMPLS, (op, name), lambda *a, **k: None)
    assert backends.auto_name("norm_quantize", dev) == want
    assert backends.auto_name("quantize_activation", dev) == ("cuda" if capability[0] == 9 else "triton")
    assert backends.auto_name("qgemm", dev) == "triton"
