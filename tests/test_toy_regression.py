"""The paper's Appendix B toy regression at small size: the qualitative claim of Figure 7."""

from __future__ import annotations

import pytest

from titan_rw.experiments import toy_regression as toy


@pytest.fixture(scope="module")
def small_run():
    cfg = toy.ToyConfig(seeds=3, steps=300, early_steps=150, batch_size=32, lr=0.01, temperature=1.0)
    return toy.run(cfg)


def test_linupper_and_quadratic_beat_uniform_early_on_every_seed(small_run):
    cfg = small_run.config
    auc = small_run.mse[:, :, 1 : cfg.early_steps + 1].mean(-1)  # [strategy, seed]
    k = {name: i for i, name in enumerate(cfg.strategies)}
    for seed in range(cfg.seeds):
        assert auc[k["linupper"], seed] < auc[k["uniform"], seed], f"seed {seed}: {auc[:, seed].tolist()}"
        assert auc[k["quadratic"], seed] < auc[k["uniform"], seed], f"seed {seed}: {auc[:, seed].tolist()}"
    # LinUpper is the fastest of all (the paper's headline claim for Figure 7).
    assert auc.mean(1).argmin().item() == k["linupper"]


def test_extremes_is_not_better_than_uniform(small_run):
    rows = {r["strategy"]: r for r in toy.summarize(small_run)}
    assert rows["extremes"]["auc"] >= rows["uniform"]["auc"]
    assert rows["extremes"]["seeds_better_than_uniform"] == 0


def test_summary_and_training_sane(small_run):
    mse = small_run.mse
    assert mse.isfinite().all()
    assert (mse[:, :, -1] < 0.2 * mse[:, :, 0]).all()  # every strategy learns
    rows = toy.summarize(small_run)
    assert [r["strategy"] for r in rows] == list(toy.DEFAULT_STRATEGIES)
    table = toy.format_table(rows, small_run.config)
    assert table.count("\n") == len(rows) + 1


def test_main_writes_png_and_prints_table(tmp_path, capsys):
    out = tmp_path / "toy"
    rc = toy.main(["--quick", "--seeds", "2", "--steps", "60", "--early-steps", "30", "--out", str(out)])
    assert rc == 0
    png = out / "toy_regression.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure really draws every strategy's curve: decode it and count the pixels in each line's
    # color (matplotlib's default cycle, in strategy order). The legend alone has ~60 per color; a
    # figure whose curves are missing (NaN data, a strategy left out, an empty axes) has no more.
    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(str(png))[..., :3]
    assert rgb.shape[:2] == (504, 768)  # 6.4 x 4.2 in at 120 dpi
    cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    assert len(toy.DEFAULT_STRATEGIES) < len(cycle)

    def pixels(color):
        want = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(rgb - want).max(-1) < 0.02).sum())

    for name, color in zip(toy.DEFAULT_STRATEGIES, cycle):
        assert pixels(color) > 300, (name, color, pixels(color))
    assert pixels(cycle[len(toy.DEFAULT_STRATEGIES)]) == 0  # and no curve more than the strategies
    text = capsys.readouterr().out
    for name in toy.DEFAULT_STRATEGIES:
        assert f"| {name} |" in text


def test_main_rejects_unknown_strategy(tmp_path, capsys):
    assert toy.main(["--strategies", "uniform,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_outliers_option_sets_m(tmp_path, capsys):
    """--outliers m: Appendix B.3's 25 % (m = 1067 next to n = 3200) vs B.2's 20 % (the default 800)."""
    assert toy.main(["--seeds", "1", "--steps", "5", "--early-steps", "5", "--outliers", "1067",
                     "--strategies", "uniform", "--out", str(tmp_path)]) == 0
    assert "n=3200, m=1067 outliers" in capsys.readouterr().out
    assert toy.config_from_args(toy._parse(["--outliers", "1067"])).m == 1067
    assert toy.ToyConfig().m == 800
    assert toy.main(["--outliers", "-1", "--out", str(tmp_path)]) == 2
    assert "--outliers must be >= 0" in capsys.readouterr().err
