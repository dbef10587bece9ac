"""The testbed: procedural data, trajectory checker, sampler, model files, metrics, training resume, and the
shipped model's record."""
import json

import numpy as np
import pytest
import torch

from qvdit.testbed.checker import check_clips, motion_accuracy
from qvdit.testbed.data import DataConfig, all_labels, batch, draw_params, eval_labels, label_text, render
from qvdit.testbed.model import ASSETS, WAN_CONFIG, build_model, load_testbed, rounded_copy, save_testbed
from qvdit.testbed.sampler import sample, timesteps

TINY_WAN = dict(WAN_CONFIG, num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=16)
TINY_DATA = DataConfig(frames=4, size=16)


# ----------------------------------------------------------------------------- data
def test_data_is_seeded_and_in_range():
    a, la = batch(16, seed=7)
    b, lb = batch(16, seed=7)
    c, _ = batch(16, seed=8)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (16, 3, 8, 32, 32) and float(a.min()) >= -1 and float(a.max()) <= 1
    assert label_text(torch.tensor([[1, 2, 3]])) == ["a blue disc moving up"]
    assert all_labels().shape == (32, 3) and torch.equal(eval_labels(64)[32:], all_labels())


def test_first_frame_does_not_tell_the_direction():
    labels = torch.tensor([[0, 0, m] for m in range(4)])
    params = draw_params(labels[:1], DataConfig(), torch.Generator().manual_seed(3))
    params = {k: v.expand(4, *v.shape[1:]) for k, v in params.items()}
    clips, _ = render(labels, DataConfig(), params=params)
    assert all(torch.equal(clips[0, :, 0], clips[i, :, 0]) for i in range(4))
    assert not torch.equal(clips[0, :, -1], clips[1, :, -1])


# ----------------------------------------------------------------------------- checker
def test_checker_scores_every_ground_truth_clip():
    labels = all_labels().repeat(16, 1)  # 512 clips, every label 16 times
    clips, _ = render(labels, DataConfig(), torch.Generator().manual_seed(11))
    res = motion_accuracy(clips, labels)
    assert res["accuracy"] == 1.0 and res["colour_accuracy"] == 1.0 and res["no_motion"] == 0.0


def test_checker_rejects_wrong_motion():
    labels = all_labels()
    clips, params = render(labels, DataConfig(), torch.Generator().manual_seed(2))
    assert motion_accuracy(clips.flip(2), labels)["accuracy"] == 0.0  # played backwards
    still, _ = render(labels, DataConfig(), params=dict(params, speed=torch.zeros(32)))
    assert (check_clips(still)["motion"] == -1).all()
    assert (check_clips(torch.full_like(clips, -1.0))["motion"] == -1).all()  # no object
    diag = clips.clone()  # right-moving objects also drifting down as fast: no clear direction
    right = labels[:, 2] == 0
    shifted = torch.stack([torch.roll(clips[right][:, :, f], shifts=int(round(1.5 * f)), dims=-2) for f in range(8)], 2)
    diag[right] = shifted
    assert not check_clips(diag[right], labels[right][:, 2])["correct"].any()


# ----------------------------------------------------------------------------- sampler
def test_euler_sampler_follows_an_exact_velocity():
    x0 = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def exact(hidden_states, timestep, encoder_hidden_states, return_dict):
        t = timestep[:, None, None, None, None] / 1000
        return ((hidden_states - x0.repeat(hidden_states.shape[0] // 2, 1, 1, 1, 1)) / t,)  # (x_t - x0) / t = eps - x0

    noise = torch.randn_like(x0)
    out = sample(exact, torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), noise, steps=5, cfg=3.0,
                 record=lambda *a: calls.append(a[1]))
    assert torch.allclose(out, x0, atol=1e-5)
    assert len(calls) == 10 and calls[0] == 1.0  # both CFG branches recorded at every step
    ts = timesteps(4, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())


# ----------------------------------------------------------------------------- model files
def test_save_load_roundtrip(tmp_path):
    model = build_model(0, TINY_WAN, TINY_DATA).eval()
    save_testbed(model, tmp_path / "m", {"data_seed": 1, "status": "test"})
    loaded, meta = load_testbed(tmp_path / "m")
    x, t, lab = torch.randn(2, 3, 4, 16, 16), torch.tensor([0.3, 0.9]), torch.tensor([[0, 1, 2], [1, 3, 0]])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, lab), rounded_copy(model)(x, t, lab))
    assert meta["data_seed"] == 1 and meta["data"]["frames"] == 4 and meta["weights_dtype"] == "float16"
    with pytest.raises(FileNotFoundError, match="testbed"):
        load_testbed(tmp_path / "missing")


def test_shipped_model_record_and_motion():
    meta = json.loads((ASSETS / "testbed_wan.json").read_text())
    assert meta["status"] == "shipped" and meta["fp_eval"]["accuracy"] >= 0.9 and meta["fp_eval"]["clips"] >= 240
    assert isinstance(meta["data_seed"], int) and meta["parameters"] < 5_000_000
    model, _ = load_testbed()
    from qvdit.testbed.train import generate

    labels = torch.tensor([[0, 0, 0], [1, 2, 1], [0, 3, 2], [1, 1, 3]])
    clips = generate(model, labels, seed=5, steps=10, cfg=meta["sampler"]["cfg"])
    assert check_clips(clips, labels[:, 2])["correct"].sum() >= 3  # it draws the labelled motion


# ----------------------------------------------------------------------------- metrics
def test_paired_metrics():
    from qvdit.testbed.metrics import paired_metrics, paired_stats, write_gif

    labels = eval_labels(4)
    clips, _ = render(labels, DataConfig(), torch.Generator().manual_seed(0))
    same = paired_metrics(clips, clips, labels)
    assert np.all(same["psnr"] == 100) and np.allclose(same["ssim"], 1) and not same["tdiff_mae"].any()
    assert not same["flow_epe"].any() and not same["traj_err"].any() and np.all(same["motion_ok"] == 1)
    noisy = (clips + 0.1 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    m = paired_metrics(noisy, clips, labels)
    assert np.all(m["psnr"] < 30) and np.all(m["ssim"] < 0.9) and np.all(m["tdiff_mae"] > 0)
    st = paired_stats(np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 1.0]), higher_is_better=True)
    assert st["mean_delta"] == pytest.approx(2 / 3) and st["frac_improved"] == pytest.approx(2 / 3)


def test_write_gif(tmp_path):
    import imageio.v2 as imageio

    from qvdit.testbed.metrics import write_gif

    clips, _ = render(eval_labels(3), TINY_DATA)
    write_gif(tmp_path / "a.gif", [clips, clips[:2]], scale=2)
    frames = imageio.mimread(tmp_path / "a.gif")
    assert len(frames) == 4 and frames[0].shape[:2] == (2 * 32 + 2, 3 * 34 - 2)


# ----------------------------------------------------------------------------- training
def test_train_resumes(tmp_path):
    from qvdit.testbed.train import main

    common = ["--tiny", "--workdir", str(tmp_path / "state"), "--batch", "4", "--eval-clips", "4", "--select-clips", "4",
              "--eval-steps", "2", "--cfgs", "2", "--device", "cpu", "--log-every", "1"]
    assert main(common + ["--max-steps", "2", "--export", str(tmp_path / "tb"), "--out-dir", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 2
    assert main(common + ["--max-steps", "3"]) == 0
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 3
    meta = json.loads((tmp_path / "tb.json").read_text())
    assert meta["status"] == "not_shipped" and meta["train"]["steps"] == 2 and "fp_eval" in meta
    assert (tmp_path / "out" / "samples.gif").is_file()
