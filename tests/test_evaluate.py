"""The digits quality measure: fixed, ranks real digits above noise; the Fréchet maths; the script."""
import json

import numpy as np
import pytest
from scipy import linalg

from diffusion.outputs import image_grid, rows_by_label, save_npz
from evaluation.digits import digits_features, evaluate_digits, real_digits_uint8
from evaluation.frechet import frechet_distance, gaussian_stats


def _real_subset(n=200, seed=1):
    images, labels = real_digits_uint8()
    pick = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return images[pick], labels[pick]


def test_measure_ranks_real_digits_above_noise():
    images, labels = _real_subset()
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    blank = np.zeros_like(images)
    real, bad, empty = (evaluate_digits(x, labels) for x in (images, noise, blank))
    assert real["accuracy"] > 0.95 and real["knn_accuracy"] > 0.95
    assert bad["accuracy"] < 0.3 and empty["accuracy"] < 0.3
    assert real["frechet"] < 1.5 * real["frechet_real_floor"]
    assert bad["frechet"] > 10 * real["frechet"] and empty["frechet"] > 3 * real["frechet"]
    # wrong labels on real digits: the classifier disagrees
    assert evaluate_digits(images, (labels + 1) % 10)["accuracy"] < 0.05


def test_measure_is_fixed_and_reads_run_images():
    images, labels = _real_subset(50)
    rgb = np.repeat(images[..., None], 3, axis=-1)                  # as a run writes grey images
    up = images.repeat(2, axis=1).repeat(2, axis=2)                  # upsampled 16x16 digits
    a, b, c = evaluate_digits(images, labels), evaluate_digits(rgb, labels), evaluate_digits(up, labels)
    assert a == b == c
    np.testing.assert_allclose(digits_features(images[:1]).max(), 16.0)  # back on the data set's 0..16 scale
    with pytest.raises(ValueError, match="digit images"):
        digits_features(np.zeros((2, 7, 7), np.uint8))


def test_real_digits_uint8_is_the_documented_pixel_mapping():
    from data.datasets import digits_arrays

    raw, _ = digits_arrays()
    images, _ = real_digits_uint8()
    assert images[raw == 0].max() == 0 and images[raw == 16].min() == 255   # ink bright, not inverted
    np.testing.assert_allclose(images.astype(float), np.clip(raw * 255 / 16 + 0.5, 0, 255).astype(np.uint8), atol=0)


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.0
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    reference = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_evaluate_script_writes_eval_json(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parents[1] / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images, labels = _real_subset(30)
    for job in ("0", "1"):  # a multirun folder: one run per subfolder
        (tmp_path / job).mkdir()
        save_npz(np.repeat(images[..., None], 3, axis=-1), labels, tmp_path / job / "samples.npz")
    assert script.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "1" / "eval.json").read_text())
    assert result["num_images"] == 30 and result["accuracy"] > 0.9
    assert script.main([str(tmp_path / "missing")]) == 2


def test_grid_rows_by_label():
    images = np.stack([np.full((2, 2, 3), k, np.uint8) for k in range(5)])
    labels = np.array([1, 0, 1, 0, 1])
    cells, ncols = rows_by_label(images, labels)
    assert ncols == 3 and cells.shape == (6, 2, 2, 3)
    assert [int(c[0, 0, 0]) for c in cells] == [1, 3, 0, 0, 2, 4]  # row 0: class 0 (+ a blank), row 1: class 1
    assert image_grid(cells, ncols).shape == (2 * 4 + 2, 3 * 4 + 2, 3)


def test_figures_script_plots_a_sweep(tmp_path, capsys):
    """A fake two-job sweep in Hydra's multirun layout -> figure and table (time: fastest repeat)."""
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location("figures", scripts / "figures.py")
        figures = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(figures)
        images, labels = _real_subset(20)
        for sweep, slow in (("a", 2.0), ("b", 1.0)):
            for job, ratio in (("0", 0.0), ("1", 0.5)):
                folder = tmp_path / sweep / job
                (folder / ".hydra").mkdir(parents=True)
                (folder / ".hydra" / "config.yaml").write_text(
                    "model:\n  name: L\naccel:\n  models:\n    small:\n      name: S\n"
                    f"  tstitch:\n    ratio: {ratio}\n")
                metrics = {"sampling_seconds": slow * (2.0 - ratio), "num_images": 20, "steps": 10,
                           "steps_per_model": {"L": 10 - int(10 * ratio), "S": int(10 * ratio)}}  # key-sorted
                (folder / "metrics.json").write_text(json.dumps(metrics))
                save_npz(images, labels, folder / "samples.npz")
        assert figures.main([str(tmp_path / "a"), str(tmp_path / "b"), "--table", str(tmp_path / "t.md")]) == 0
    finally:
        sys.path.remove(str(scripts))
    assert (tmp_path / "a" / "tstitch_digits.png").stat().st_size > 1000
    table = (tmp_path / "t.md").read_text()
    assert "| 0.0 | 0 / 10 |" in table and "| 0.5 | 5 / 5 |" in table  # small first, as they run
    assert "| 1.50 | 1.33x |" in table  # fastest repeat (b): 1.0 * 1.5 s, vs 2.0 s at fraction 0
