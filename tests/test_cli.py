"""The `qvdit` command line: `qvdit demo` (the README's first command) on the shipped model, its random-weights
variant, and the entry points."""
import subprocess
import sys

import pytest

from qvdit.cli import main
from qvdit.demo import DEMO_LABELS, run_demo, run_random_demo


def test_demo_on_the_shipped_model(tmp_path, capsys):
    import imageio.v2 as imageio

    gif = tmp_path / "demo.gif"
    rows = run_demo(steps=6, out=str(gif))
    out = capsys.readouterr().out
    assert "shipped calibration" in out and "W3A6 RTN" in out and "ms/step" in out
    fp, qv, rtn = rows
    assert fp["name"].startswith("fp32") and "Q-VDiT" in qv["name"] and "RTN" in rtn["name"]
    for r in (qv, rtn):
        q_bytes, bf16_bytes = r["bytes"]
        assert q_bytes < 0.25 * bf16_bytes  # 3-bit weights with scales, zeros and TQE
    assert qv["psnr"] > rtn["psnr"] + 2  # the shipped calibration is closer to FP than RTN (same noise)
    assert fp["motion_ok"] >= len(DEMO_LABELS) - 1 and qv["motion_ok"] >= len(DEMO_LABELS) - 1
    frames = imageio.mimread(gif)
    assert len(frames) == 8 and frames[0].shape[0] > 3 * 32 * 4  # three rows of 32x32 clips at 4x


def test_random_demo_table_values(capsys):
    rows = run_random_demo(frames=2, size=8)
    assert "W3A6" in capsys.readouterr().out
    by = {r[0].split()[0]: r for r in rows}
    w8, w4, w3 = by["W8A8"], by["W4A8"], by["W3A6"]
    assert w3[1] < w4[1] < w8[1] < w8[2]  # fewer bytes with fewer bits, all below bf16
    assert 0 < w8[3] < w4[3] < w3[3] < 0.5  # more error with fewer bits, but bounded
    assert by["bf16"][3] < w4[3]


def test_cli_entry_points(tmp_path):
    with pytest.raises(SystemExit):
        main(["--help"])
    res = subprocess.run([sys.executable, "-m", "qvdit", "demo", "--steps", "2", "--no-rtn", "--out", str(tmp_path / "d.gif")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "W3A6 Q-VDiT" in res.stdout and (tmp_path / "d.gif").is_file()
    res = subprocess.run([sys.executable, "-m", "qvdit", "nonsense"], capture_output=True, text=True)
    assert res.returncode != 0 and "invalid choice" in res.stderr


@pytest.mark.parametrize("out,match", [("demo_out", "must be a .gif path"), ("no/such/folder/d.gif", "does not exist")])
def test_demo_out_checked_before_sampling(tmp_path, out, match):
    """A wrong --out is one line naming the argument, at once (it used to fail in imageio after the sampling)."""
    res = subprocess.run([sys.executable, "-m", "qvdit", "demo", "--out", str(tmp_path / out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "qvdit demo: error: --out" in res.stderr and match in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(ValueError, match=match):
        run_demo(out=str(tmp_path / out))
