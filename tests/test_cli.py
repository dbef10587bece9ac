"""The `qvdit` command line: `qvdit demo` (the README's first command) runs and prints its table."""
import subprocess
import sys

import pytest

from qvdit.cli import main
from qvdit.demo import run_demo


def test_demo_table_values(capsys):
    rows = run_demo(frames=2, size=8)
    out = capsys.readouterr().out
    assert "W3A6" in out and "W4A8" in out and "ms/forward" in out
    by = {r[0].split()[0]: r for r in rows}
    w8, w4, w3 = by["W8A8"], by["W4A8"], by["W3A6"]
    assert w3[1] < w4[1] < w8[1] < w8[2]  # fewer bytes with fewer bits, all below bf16
    assert 0 < w8[3] < w4[3] < w3[3] < 0.5  # more error with fewer bits, but bounded
    assert by["bf16"][3] < w4[3]


def test_cli_entry_points():
    with pytest.raises(SystemExit):
        main(["--help"])
    res = subprocess.run([sys.executable, "-m", "qvdit", "demo", "--frames", "2", "--size", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "W3A6" in res.stdout
    res = subprocess.run([sys.executable, "-m", "qvdit", "nonsense"], capture_output=True, text=True)
    assert res.returncode != 0 and "invalid choice" in res.stderr
