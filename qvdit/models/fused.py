"""Fusion around a block's quantized linears (issue 6, item 5):

- `feed`: the LayerNorm + adaLN modulation in front of the linears runs as one kernel that also quantizes
  its output (`qvdit_kernels.norm_quantize`), and each consuming QLinear (q, k and v share one pass)
  receives its codes, scale, row sums and TQE term directly.
- `attention_into` / `ffn_into`: what follows a linear goes into its GEMM epilogue: the (gated) residual add of
  the block into the attention output projection and fc2 (`qvdit_kernels.qgemm(residual=, residual_gate=)`), so
  those elementwise passes over the [tokens, C] activations (float32 in Wan) disappear. The FFN's GELU goes into
  fc1's epilogue where fc1's GEMM fuses its tail (Triton; `qgemm(activation=)`), and else into fc2's act-quant
  (`qvdit_kernels.qlinear(input_activation=)`, which quantizes the GELU of fc1's output as it reads it): the CUDA
  GEMM would run it as a pass of its own over fc1's [tokens, 4C] output (`qvdit_kernels.ops.tail_as_own_pass`).
  The GELU costs an act-quant pass more than it costs a GEMM epilogue (it is bound by the special-function unit:
  on the H200 the act-quant of wan14b fc2's input ran 0.59x as fast with it on Triton and 0.61x on CUDA, BENCHMARKS
  run 8), so it goes to fc2 only to save that pass. There fc1's output is dead once fc2 has quantized it, so fc2
  writes the codes over it (`qlinear(overwrite_input=True)`, also where fc1 fused the GELU; `QVDIT_FFN_INPLACE=0`
  turns it off): the FFN's activations take one [tokens, 4C] bf16 buffer, not that plus an int8 copy. On the
  H200 this is what brings the compiled Wan2.1-1.3B's peak down by its whole weight saving (BENCHMARKS e2e run
  10); tests/test_cuda_kernels.py and test_fused_producers.py check it. Where the block's residual is its own
  (`ffn_into(residual_dead=True)`), fc2's output goes into the bytes of fc1's rows its codes leave free and the
  residual add over the residual (`qlinear(overwrite_residual=True)`): the FFN then allocates nothing after fc1's
  output. CogVideoX's and Latte's blocks add a gated slice of the FFN's output themselves: their FeedForwards run
  `ffn_forward` (`install_ffn_forward`, from their adapters), the same GELU placement and fc2's codes over fc1's
  output, without the residual.

Eager and compiled: the kernels are custom ops, and the handoffs (`QLinear._prequant`, `QLinear._residual`) are
set and consumed inside one block's forward, so `torch.compile(fullgraph=True)` traces them as plain side effects
(tests/test_fused_producers.py). `QVDIT_FUSE_PRODUCERS=0` turns it off (for A/B benchmarks; read when a block is
traced or run). The fused result equals the unfused one bit for bit on the reference backend (same torch
ops for y, and `reference.epilogue_tail` is the block's own expression); on Triton y may differ from torch's
LayerNorm by one ulp of bf16 in rare elements, GELU and the residual add by one ulp of their rounding.
"""
from __future__ import annotations

import functools
import os
import types

import torch
from torch import nn

import qvdit_kernels as qk
from qvdit_kernels import backends

from ..qlinear import QLinear


def enabled() -> bool:
    return os.environ.get("QVDIT_FUSE_PRODUCERS", "1") != "0"


def ffn_inplace() -> bool:
    """fc2 writes its activation codes over fc1's output (module docstring); QVDIT_FFN_INPLACE=0 turns it off."""
    return os.environ.get("QVDIT_FFN_INPLACE", "1") != "0"


def ffn_over() -> bool:
    """With `ffn_inplace()`: fc2 also writes its output into fc1's rows and its residual add over the residual
    (`ffn_into(residual_dead=True)`); QVDIT_FFN_OVER=0 turns that part off (the peak A/B of BENCHMARKS run 19)."""
    return ffn_inplace() and os.environ.get("QVDIT_FFN_OVER", "1") != "0"


def norm_backend(backend: str, device: torch.device) -> str | None:
    """The backend whose norm_quantize feeds QLinears of `backend` on `device`: their own (for "auto", CUDA's
    kernel before Triton's), or Triton's where theirs is missing (a CUDA build without csrc/norm_quant.cu); the
    GEMMs of either backend take the codes, scales, u and row sums as they are. None: none.
    QVDIT_NORM_BACKEND=triton|cuda picks that kernel for every fused norm (benchmarks compare the two in a model)."""
    if backend == "torch":
        return backend
    forced = os.environ.get("QVDIT_NORM_BACKEND")
    if forced is not None and forced not in ("triton", "cuda"):
        raise ValueError(f"QVDIT_NORM_BACKEND must be 'triton' or 'cuda', got {forced!r}")
    for name in (forced,) if forced else ((backend, "triton") if backend == "cuda" else (backend,)):
        if backends.resolve("norm_quantize", name, device, fallback=False) is not None:
            return name
    return None


def can_feed(norm: nn.Module, consumers: list, x: torch.Tensor) -> bool:
    """A LayerNorm whose output goes only to QLinears of one activation width, TQE setting and backend,
    with a norm_quantize kernel for them on x's device (`norm_backend`)."""
    if not isinstance(norm, nn.LayerNorm) or not consumers or not all(isinstance(q, QLinear) for q in consumers):
        return False
    q0 = consumers[0]
    if any((q.a_bits, q.tqe, q.backend, q.in_features) != (q0.a_bits, q0.tqe, q0.backend, q0.in_features)
           for q in consumers) or norm.normalized_shape != (q0.in_features,):
        return False
    nb = norm_backend(q0.backend, x.device)
    if nb == "cuda" and backends.resolve("norm_quantize", "triton", x.device, fallback=False) is None:
        from qvdit_kernels.cuda import norm_quant_ok  # (rows the CUDA kernel refuses need Triton's: none here)

        return norm_quant_ok(x.reshape(-1, x.shape[-1]), len(consumers) if q0.tqe else 0)
    return nb is not None


def _plain(norm, x, scale, shift):
    y = norm(x.float())
    return (y if scale is None else y * (1 + scale) + shift).type_as(x)


def codes_only_enabled() -> bool:
    """Whether a fused norm may skip writing y where its consumers are the only readers (`feed(codes_only=)`);
    QVDIT_CODES_ONLY=0 turns it off."""
    return os.environ.get("QVDIT_CODES_ONLY", "1") != "0"


def projections_only(attn: nn.Module) -> bool:
    """diffusers' own Wan attention processor: it reads its hidden_states only through the q/k/v projections
    (to_q/to_k/to_v or to_qkv), so a fused norm in front of them need not write y (`feed(codes_only=)`)."""
    proc = getattr(attn, "processor", None)
    return type(proc).__name__ == "WanAttnProcessor" and type(proc).__module__.startswith("diffusers.")


def _unwritten(b: int, s: int, c: int, x: torch.Tensor) -> torch.Tensor:
    """The stand-in for a y the norm did not write: NaN everywhere (one element, expanded), so any reader that is
    not a consumer taking its codes computes NaN rather than a plausible wrong value (and QLinear raises)."""
    return torch.full((1, 1, 1), float("nan"), dtype=x.dtype, device=x.device).expand(b, s, c)


def check_consumed(linears) -> None:
    """After the call that should have consumed them: a handoff of codes whose y was not written and that no
    consumer took means y's stand-in went somewhere else (a processor this module does not know)."""
    for q in linears:
        pre = getattr(q, "_prequant", None)
        if isinstance(q, QLinear) and pre is not None and not pre[5]:
            q._prequant = None
            raise RuntimeError(f"{q.name or 'QLinear'}: a fused norm left this layer its codes without writing y, "
                               "and the layer was not called on it; set QVDIT_CODES_ONLY=0 for this model")


def consuming(call, linears):
    """call(), the call that should consume the codes-only handoffs of `linears`, then `check_consumed(linears)`; if
    call() raises, their handoffs are dropped, so that a later call on another tensor quantizes it itself instead of
    raising (QLinear.forward)."""
    done = False
    try:
        out = call()
        done = True
    finally:
        if not done:
            for q in linears:
                if isinstance(q, QLinear):
                    q._prequant = None
    check_consumed(linears)
    return out


def feed(norm: nn.Module, x: torch.Tensor, consumers: list, scale=None, shift=None, *, codes_only: bool = False,
         residual=None, residual_gate=None):
    """(norm(x.float()) [* (1 + scale) + shift]).type_as(x), x [B, S, C]; scale/shift [B, 1, C] or [B, S, C].

    Fused (when `enabled()` and `can_feed`): one norm_quantize pass, and each consumer is left the codes for
    its next call on the returned tensor. Otherwise the same expression as diffusers' Wan block.
    codes_only (the caller knows the consumers are y's only readers): y is not written, and the returned tensor
    is a NaN stand-in that only identifies it (`_unwritten`; the consumers take their codes by it).
    residual (gate [B, 1, C] float32 or None): the norm's input is h = residual_add(residual, x, gate), the block's
    residual add after an attention output, in the same pass (`qvdit_kernels.add_norm_quantize`); returns (h, y)."""
    def plain():  # diffusers' expression: [the residual add, then] the norm and modulation
        if residual is None:
            return _plain(norm, x, scale, shift)
        h = residual_add(residual, x, residual_gate)
        return h, _plain(norm, h, scale, shift)

    rows = None if residual is None else _gate_rows(residual_gate, residual)
    if not (enabled() and rows is not False and (residual is None or residual.dtype == x.dtype)
            and can_feed(norm, consumers, x)):
        return plain()
    b, s, c = x.shape
    x2 = x.reshape(b * s, c)
    mod_rows, sc, sh = 1, None, None
    if scale is not None:
        mod_rows = s if scale.shape[1] == 1 else 1
        sc, sh = scale.reshape(-1, c), shift.reshape(-1, c)
    alphas = gates = frame_id = None
    if consumers[0].tqe:
        tqe = [q.tqe_inputs(b * s, x.device) for q in consumers]
        alphas = torch.stack([t[0] for t in tqe])
        frame_id = tqe[0][3]
        if all(t[2] is not None for t in tqe) and len({t[2].shape for t in tqe}) == 1:
            gates = torch.stack([t[2] for t in tqe])
        elif any(t[2] is not None for t in tqe):  # mixed gating: not what a norm's consumers look like
            return plain()
    write_y = not (codes_only and codes_only_enabled())
    args = (consumers[0].a_bits, norm.eps, norm.weight, norm.bias, sc, sh, mod_rows, alphas, gates, frame_id)
    nb = norm_backend(consumers[0].backend, x.device)
    if residual is None:
        y, xq, sx, u, rs = qk.norm_quantize(x2, *args, write_y=write_y, backend=nb)
    else:
        h, y, xq, sx, u, rs = qk.add_norm_quantize(x2, residual.reshape(b * s, c), *args, residual_gate=rows,
                                                   write_y=write_y, backend=nb)
    y = y.view(b, s, c) if write_y else _unwritten(b, s, c, x)
    for j, q in enumerate(consumers):
        q._prequant = (y, xq, sx, rs, None if u is None else u[j], write_y)
    return y if residual is None else (h.view(b, s, c), y)


# ----------------------------------------------------------------------------- epilogue fusion
def residual_add(residual: torch.Tensor, out: torch.Tensor, gate=None) -> torch.Tensor:
    """The block's residual add as diffusers' Wan block writes it: residual + out, or with a float32 gate
    (residual.float() + out * gate).type_as(residual)."""
    if gate is None:
        return residual + out
    return (residual.float() + out.float() * gate).type_as(residual)


def _gate_rows(gate, residual: torch.Tensor):
    """A gate [B or 1, 1 or S, C] (float32) as the [G, C] rows the epilogue indexes by m // (M // G); None for
    no gate; False when it cannot be expressed so (the caller then runs the plain expression)."""
    if gate is None:
        return None
    b, s, c = residual.shape
    if gate.dtype != torch.float32 or gate.dim() != 3 or gate.shape[-1] != c:
        return False
    if gate.shape[:2] == (b, 1) or gate.shape[:2] == (1, 1):
        return gate.reshape(-1, c)
    if gate.shape[:2] == (b, s):
        return gate.reshape(b * s, c)
    return False


def _inactive(m) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))


def _projections(attn: nn.Module) -> list:
    return [getattr(attn, n, None) for n in ("to_q", "to_k", "to_v", "to_qkv")]


def attention_then_feed(attn: nn.Module, call, residual: torch.Tensor, gate, norm: nn.Module, consumers: list,
                        scale=None, shift=None, codes_only: bool = False):
    """(h, y): h = residual_add(residual, call(), gate), attention module `attn`'s output added to the residual
    stream, and y = feed(norm, h, consumers, scale, shift, codes_only=). Where the output projection would run that
    add as a pass of its own (its GEMM on the CUDA backend: `qvdit_kernels.ops.tail_as_own_pass`), the add runs in
    the norm's pass instead (`feed(residual=)`: one pass reads the output and the residual and writes h and the
    codes); else in the projection's epilogue (`attention_into`)."""
    lin = attn.to_out[0] if isinstance(getattr(attn, "to_out", None), nn.ModuleList) else None
    if (enabled() and isinstance(lin, QLinear) and residual.dim() == 3
            and qk.ops.tail_as_own_pass(lin.backend, residual.device, lin.w_bits, lin.in_features)
            and can_feed(norm, consumers, residual)):
        out = consuming(call, _projections(attn))
        return feed(norm, out, consumers, scale, shift, codes_only=codes_only, residual=residual, residual_gate=gate)
    h = attention_into(attn, call, residual, gate)
    return h, feed(norm, h, consumers, scale, shift, codes_only=codes_only)


def attention_into(attn: nn.Module, call, residual: torch.Tensor, gate=None) -> torch.Tensor:
    """residual_add(residual, call(), gate), where `call()` runs attention module `attn`: with its output
    projection `attn.to_out[0]` a QLinear, the add happens in that GEMM's epilogue (a handoff the projection
    takes on its next call with residual's shape; if the processor never makes that call, the plain add runs)."""
    lin = attn.to_out[0] if isinstance(getattr(attn, "to_out", None), nn.ModuleList) else None
    rows = _gate_rows(gate, residual)
    if not (enabled() and isinstance(lin, QLinear) and residual.dim() == 3 and rows is not False
            and all(_inactive(m) for m in list(attn.to_out)[1:])):
        return residual_add(residual, consuming(call, _projections(attn)), gate)
    b, s, c = residual.shape
    lin._residual = (residual.reshape(b * s, c), rows)
    try:
        out = consuming(call, _projections(attn))
    finally:
        consumed, lin._residual = lin._residual is None, None
    return out if consumed else residual_add(residual, out, gate)


def ffn_into(ffn: nn.Module, x: torch.Tensor, residual: torch.Tensor, gate=None, residual_dead: bool = False
             ) -> torch.Tensor:
    """residual_add(residual, ffn(x), gate) for diffusers' FeedForward [GELU(tanh) with proj, Dropout, Linear,
    (Dropout)]: with both linears QLinears, fc2 applies the residual add in its epilogue, and the GELU runs in
    fc1's epilogue or fc2's act-quant pass (module docstring). residual_dead: the caller does not read residual
    afterwards, so the result may be written over it (`ffn_over()`: fc2's output then goes into fc1's rows
    beside its codes and the add over the residual, `qlinear(overwrite_residual=True)`)."""
    rows = _gate_rows(gate, residual) if residual.dim() == 3 else False
    if not (enabled() and rows is not False and ffn_quantized(ffn) and residual.dtype == x.dtype):
        net = getattr(ffn, "net", None)
        act = net[0] if isinstance(net, nn.ModuleList) and len(net) > 0 else None
        return residual_add(residual, consuming(lambda: ffn(x), [getattr(act, "proj", None)]), gate)
    return ffn_forward(ffn, x, residual=residual, residual_gate=rows, overwrite_residual=residual_dead and ffn_over())


def ffn_quantized(ffn: nn.Module) -> bool:
    """diffusers' FeedForward [GELU(tanh) with proj, Dropout, Linear, (Dropout)] with both linears QLinears and the
    dropouts inactive: what `ffn_into` and `ffn_forward` take over."""
    net = getattr(ffn, "net", None)
    act = net[0] if isinstance(net, nn.ModuleList) and len(net) in (3, 4) else None
    return (type(act).__name__ == "GELU" and getattr(act, "approximate", None) == "tanh"
            and isinstance(getattr(act, "proj", None), QLinear) and isinstance(net[2], QLinear)
            and all(_inactive(m) for m in list(net)[1:2] + list(net)[3:]))


def ffn_forward(ffn: nn.Module, x: torch.Tensor, **tail) -> torch.Tensor:
    """ffn(x) for a `ffn_quantized` FeedForward, `tail` (residual, residual_gate, overwrite_residual) given to fc2 as
    `ffn_into` does; without it, the FFN of a block that adds a gated slice of the output itself (CogVideoX, Latte).
    The GELU runs in fc1's epilogue, or in fc2's act-quant where fc1's GEMM would run it as a pass of its own, and
    fc2 may write its codes over fc1's output (`ffn_inplace()`), which nothing else reads."""
    fc1, fc2 = ffn.net[0].proj, ffn.net[2]
    if qk.ops.tail_as_own_pass(fc1.backend, x.device, fc1.w_bits, fc1.in_features):
        # fc1's output before the GELU, which fc2 applies as it quantizes h (QVDIT_FFN_INPLACE: over h)
        h = consuming(lambda: fc1(x), [fc1])
        return fc2(h, input_activation="gelu_tanh", overwrite_input=ffn_inplace(), **tail)
    # (fc1 fused the GELU: its output is as dead after fc2, so fc2 may take it over the same way: a CUDA fc2 does,
    # e.g. with QVDIT_CUDA_FUSED_TAIL=1 or a Triton fc1 beside a CUDA fc2; Triton's own qlinear keeps buffers)
    return fc2(consuming(lambda: fc1(x, activation="gelu_tanh"), [fc1]), overwrite_input=ffn_inplace(), **tail)


def install_ffn_forward(model: nn.Module, blocks_attrs=("transformer_blocks",)) -> None:
    """Each block's diffusers FeedForward `ff` (in the block lists named by blocks_attrs) runs `ffn_forward` when
    `enabled()` and `ffn_quantized` (checked per call: the layers may be quantized after this), else its own."""
    for attr in blocks_attrs:
        for block in getattr(model, attr, None) or []:
            ff = getattr(block, "ff", None)
            if type(ff).__name__ == "FeedForward" and forward_replaceable(ff):
                ff.forward = types.MethodType(_ffn_forward_of(type(ff).forward), ff)


def forward_replaceable(module: nn.Module) -> bool:
    """Whether module's forward is its class's own: none set on the instance, or one bound to the class's function (what
    unpickling a module whose instance forward was replaced leaves: pickle stores a bound method by name)."""
    f = vars(module).get("forward")
    return f is None or getattr(f, "__func__", None) is type(module).forward


@functools.lru_cache(maxsize=None)
def _ffn_forward_of(original):
    """One function per FeedForward class, so compiled blocks share one graph."""
    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs or not (enabled() and ffn_quantized(self)):
            return original(self, hidden_states, *args, **kwargs)
        return ffn_forward(self, hidden_states)
    return forward


def ffn_codes_only(ffn: nn.Module) -> bool:
    """diffusers' FeedForward whose first module is its GELU with a QLinear projection: the FFN reads its input only
    through that projection (fc1), so the norm in front of it need not write y (`feed(codes_only=)`)."""
    net = getattr(ffn, "net", None)
    act = net[0] if isinstance(net, nn.ModuleList) and len(net) > 0 else None
    return (type(act).__name__ == "GELU" and type(act).__module__.startswith("diffusers.")
            and isinstance(getattr(act, "proj", None), QLinear))
