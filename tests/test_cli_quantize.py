"""`qvdit quantize` (diffusers folder -> quantized folder) and `qvdit bench` (runs benchmarks/bench_*.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import qvdit
from qvdit.cli import main

from test_adapters import tiny_wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_fp")
    tiny_wan().save_pretrained(path)
    return str(path)


def test_quantize_folder_and_reload(wan_folder, tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    dst = str(tmp_path / "w3a6")
    assert main(["quantize", wan_folder, dst, "--w-bits", "3", "--a-bits", "6", "--dtype", "float32",
                 "--skip", "blocks.0.ffn.*"]) == 0
    out = capsys.readouterr().out
    assert "linears quantized" in out and "WanTransformer3DModel.from_pretrained" in out
    model = WanTransformer3DModel.from_pretrained(dst)
    layers = qvdit.qlinears(model)
    assert layers and all((q.w_bits, q.a_bits, q.tqe) == (3, 6, True) for q in layers.values())
    assert "blocks.0.ffn.net.2" not in layers and "blocks.0.attn1.to_q" in layers


def test_quantize_a_pipeline_folder_takes_its_transformer(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    src = tmp_path / "pipe"
    WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                transformer=tiny_wan()).save_pretrained(src)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--dtype", "float32"]) == 0
    assert qvdit.qlinears(WanTransformer3DModel.from_pretrained(tmp_path / "q"))


def test_quantize_errors_name_the_problem(wan_folder, tmp_path, capsys):
    def error(*argv):
        assert main(["quantize", *argv]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "file.bin").write_text("x")
    assert "is a file" in error(str(tmp_path / "file.bin"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in error(str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "noclass").mkdir()
    (tmp_path / "noclass" / "config.json").write_text("{}")
    assert "has no _class_name" in error(str(tmp_path / "noclass"), str(tmp_path / "out"))
    (tmp_path / "badclass").mkdir()
    (tmp_path / "badclass" / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    assert "'NoSuchModel' is not a model class" in error(str(tmp_path / "badclass"), str(tmp_path / "out"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    assert "no weights" in error(str(tmp_path / "noweights"), str(tmp_path / "out"))
    assert "has no subfolder 'transformer'" in error(wan_folder, str(tmp_path / "out"), "--subfolder", "transformer")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists and is not empty" in error(wan_folder, str(tmp_path / "full"))
    assert "w_bits must be one of" in error(wan_folder, str(tmp_path / "out"), "--w-bits", "5")
    assert main(["quantize", wan_folder, str(tmp_path / "q"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert "already quantized (quant_method 'qvdit')" in error(str(tmp_path / "q"), str(tmp_path / "again"))


def test_bench_lists_runs_and_rejects(capsys):
    assert main(["bench", "list"]) == 0
    assert "e2e" in capsys.readouterr().out
    assert main(["bench", "nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err


def test_bench_e2e_tiny_through_the_cli(tmp_path):
    """The e2e script's CPU smoke path: every field the GPU run reports, on the tiny config."""
    out = tmp_path / "e2e.json"
    res = subprocess.run([sys.executable, "-m", "qvdit", "bench", "e2e", "--tiny", "--modes", "eager", "--settings",
                          "bf16,w3a6", "--reps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["setting"], r["mode"]) for r in rows] == [("bf16", "eager"), ("w3a6", "eager")]
    bf16, w3 = rows
    assert w3["linear_ratio_vs_bf16"] < 0.3 and w3["weights_bytes"] < bf16["weights_bytes"]
    assert 0 < w3["rel_err_vs_bf16"] < 0.2
    for r in rows:
        p = r["profile"]
        assert r["latency_ms"] > 0 and 0 < p["block_linears_share"] < 1 and 0 < p["attention_share"] < 1
    assert os.path.exists(str(out)[:-5] + ".md") and os.path.exists(str(out)[:-5] + ".png")


def test_bench_cuda_figure_from_saved_results(tmp_path):
    """The CUDA benchmark's figure is drawn from saved result JSONs without a GPU (how the committed figure of
    BENCHMARKS.md is made), one bar series per method and run."""
    results = os.path.join(ROOT, "benchmarks", "results")
    runs = [os.path.join(results, "cuda_h200_ws4.json") + ":(256-row tiles)",
            os.path.join(results, "cuda_h200_ws4_rows128.json") + ":(128-row tiles)"]
    res = subprocess.run([sys.executable, "-m", "qvdit", "bench", "cuda", "--plot", *runs, "--out", str(tmp_path),
                          "--tag", "fig"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_bench_linear_smoke_rows_per_backend(tmp_path):
    """bench_linear's CPU dry run with --backends: validated rows per backend (Triton under the interpreter; auto,
    which on a CPU resolves to the reference) and the per-backend columns of the table."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "benchmarks/bench_linear.py", "--smoke", "--only", "latte_qkv", "--variants",
                          "W3A6", "--modes", "gemm", "--peers", "", "--backends", "triton,auto", "--out", str(tmp_path),
                          "--tag", "t"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "linear_t.json").read_text())["rows"]
    ours = {(r["method"], r["mode"]): r for r in rows if r.get("variant")}
    assert set(ours) == {("ours W3A6", "gemm"), ("ours W3A6 +TQE", "gemm"), ("ours[auto] W3A6", "gemm"),
                         ("ours[auto] W3A6 +TQE", "gemm")}
    assert all(r["ok"] and r["ms"] > 0 for r in ours.values())
    assert "W3A6 gemm [auto]" in (tmp_path / "linear_t.md").read_text()


def test_bench_e2e_peak_live_set_on_a_synthetic_trace(tmp_path):
    """--memory-trace's reduction: the live set at the highest point, not at the end, grouped by frame."""
    sys.path.insert(0, ROOT)
    from benchmarks.bench_e2e import peak_live_set

    f = lambda name: [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},  # noqa: E731
                      {"filename": f"/r/qvdit/models/{name}.py", "line": 7, "name": name}]
    events = [{"action": "alloc", "addr": 1, "size": 100, "frames": f("a")},
              {"action": "alloc", "addr": 2, "size": 50, "frames": f("b")},
              {"action": "free_requested", "addr": 1, "size": 100},  # not yet returned: still counted
              {"action": "alloc", "addr": 3, "size": 30, "frames": f("b")},  # peak: 1000 + 180
              {"action": "free_completed", "addr": 1, "size": 100},
              {"action": "alloc", "addr": 4, "size": 120, "frames": f("c")},  # 1000 + 200 > 1180: the new peak
              {"action": "free_completed", "addr": 4, "size": 120},
              {"action": "free_completed", "addr": 9, "size": 7}]  # allocated before the trace: ignored
    got = peak_live_set(events, baseline=1000)
    assert got["peak_bytes"] == 1200 and got["live_blocks"] == 3
    assert [(t["bytes"], t["count"], t["where"]) for t in got["top"]] == [
        (120, 1, "models/c.py:7 c"), (80, 2, "models/b.py:7 b")]
    gen = tmp_path / "torchinductor_root" / "wo" / "cwo3.py"  # inductor's generated code: its line is quoted
    gen.parent.mkdir(parents=True)
    gen.write_text("def call(args):\n    buf0 = empty_strided_cuda((32760, 13824), (13824, 1), torch.bfloat16)\n")
    got = peak_live_set([{"action": "alloc", "addr": 5, "size": 9,
                          "frames": [{"filename": str(gen), "line": 2, "name": "call"}]}])
    want = "wo/cwo3.py:2 call: buf0 = empty_strided_cuda((32760, 13824), (13824, 1), torch.bfloat16)"
    assert got["top"][0]["where"] == want


def test_bench_e2e_compiles_blocks_of_a_class_that_names_none():
    """bench_e2e's regional compile for CogVideoX, whose class names no `_repeated_blocks` in diffusers 0.42 (its
    compile_repeated_blocks raises there): the blocks of its block list are compiled and the forward runs (eager
    compile backend on the CPU), giving the uncompiled output."""
    sys.path.insert(0, ROOT)
    from benchmarks.bench_e2e import compile_blocks
    from test_adapters import tiny_cogvideox

    model = tiny_cogvideox()
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, 7, 16, generator=g), timestep=torch.tensor([10]))
    with torch.no_grad():
        plain = model(**kw, return_dict=False)[0]
    torch._dynamo.reset()
    compile_blocks(model, "eager")
    assert model._repeated_blocks == ["CogVideoXBlock"]
    assert all(b._compiled_call_impl is not None for b in model.transformer_blocks)
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    torch._dynamo.reset()
    assert torch.equal(out, plain)
    with pytest.raises(ValueError, match="no _repeated_blocks"):
        compile_blocks(torch.nn.Linear(2, 2), "eager")
