"""benchmarks/bench_clocks.py's CPU parts: nvidia-smi's sample lines, their summary, and the background sampler
(driven by a stand-in command). The GPU run itself is the device's (BENCHMARKS.md names its results)."""
import sys

import pytest

from benchmarks.bench_clocks import FIELDS, OLD_REASONS, Sampler, parse_sample, reason_names, smi, summarize


def test_parse_sample_reads_numbers_and_hex_reasons():
    s = parse_sample("1755, 688.43, 61, 0x0000000000000004")
    assert s == {"clocks.sm": 1755.0, "power.draw": 688.43, "temperature.gpu": 61.0,
                 "clocks_event_reasons.active": 4}
    assert reason_names(int(s["clocks_event_reasons.active"])) == ["sw_power_cap"]


@pytest.mark.parametrize("line", ["", "clocks.sm [MHz], power.draw [W], temperature.gpu, reasons",
                                  "1755, [N/A], 61, 0x0", "1755, 688.4", "No devices were found"])
def test_parse_sample_refuses_what_is_not_a_sample(line):
    assert parse_sample(line) is None


def test_summarize_takes_medians_and_reason_shares():
    lines = ["1980, 400.0, 50, 0x0", "1755, 700.0, 60, 0x4", "1740, 699.0, 61, 0x4", "1700, 701.0, 62, 0x24"]
    out = summarize([parse_sample(x) for x in lines])
    assert out["samples"] == 4
    assert out["sm_clock_mhz"] == pytest.approx(1747.5)
    assert out["power_w"] == pytest.approx(699.5)
    assert out["temperature_c"] == pytest.approx(60.5)
    assert out["reasons_share"] == {"sw_power_cap": 0.75, "sw_thermal": 0.25}
    assert summarize([]) == {"samples": 0}


def test_sampler_keeps_only_samples_after_mark():
    # a stand-in for nvidia-smi -lms: one 'warm-up' sample, then (after a pause) samples every 20 ms
    script = ("import sys, time\n"
              "print('100, 1.0, 1, 0x0', flush=True)\n"
              "time.sleep(0.6)\n"
              "while True:\n"
              "    print('1800, 650.5, 55, 0x4', flush=True); time.sleep(0.02)\n")
    import time

    with Sampler(cmd=[sys.executable, "-c", script]) as smp:
        deadline = time.perf_counter() + 60
        while not smp._lines and time.perf_counter() < deadline:  # the first (warm-up) sample has arrived
            time.sleep(0.01)
        smp.mark()
        time.sleep(0.7)
    assert smp.window, "no samples after mark()"
    assert all(s == {"clocks.sm": 1800.0, "power.draw": 650.5, "temperature.gpu": 55.0,
                     "clocks_event_reasons.active": 4} for s in smp.window)
    assert summarize(smp.window)["sm_clock_mhz"] == 1800.0
    assert smp._proc.poll() is not None  # the sampler process is gone



def test_summarize_reads_the_older_reasons_name_and_smi_names_the_gpu():
    fields = FIELDS[:3] + (OLD_REASONS,)
    out = summarize([parse_sample("1500, 690.0, 60, 0x4", fields), parse_sample("1600, 691.0, 61, 0x0", fields)])
    assert out["reasons_share"] == {"sw_power_cap": 0.5} and out["sm_clock_mhz"] == 1550.0
    assert smi(("clocks.sm",), "GPU-1234")[-2:] == ["-i", "GPU-1234"]
    assert "-i" not in smi(("clocks.sm",))


def test_bad_variants_name_the_argument(capsys):
    from benchmarks.bench_clocks import main

    with pytest.raises(SystemExit) as exc:
        main(["--variants", "W3A16"])
    assert exc.value.code == 2 and "--variants: 'W3A16'" in capsys.readouterr().err
