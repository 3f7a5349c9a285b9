"""Resume checks the files it keeps (item 6 of issue 18): a PNG that does not decode or has another
size is made again, samples.npz is rebuilt from verified files, a done folder with a damaged file
is repaired instead of reported as complete."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from runs.resume import png_problem
from runs.run import run_from_config

from conftest import CONFIGS

ROOT = CONFIGS.parent
# batch_size=1: a sample made again alone is the same image to the bit as in a clean run
DIGITS = ["+exp=digits_stitch_0.4", "sampler.steps=6", "progress=false", "num_threads=1", "batch_size=1",
          f"model.ckpt={ROOT / 'checkpoints/digits/digits_l.pt'}",
          f"family.stitch.small.ckpt={ROOT / 'checkpoints/digits/digits_s.pt'}"]


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A clean run of 8 samples, to compare repaired folders with."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("sample", DIGITS + ["num_samples=8"])
    GlobalHydra.instance().clear()
    folder = tmp_path_factory.mktemp("clean")
    run_from_config(cfg, folder)
    return folder


def _damage(folder):
    """000005.png zero bytes (the issue's case), 000002.png cut short, 000003.png another size."""
    (folder / "000005.png").write_bytes(b"")
    data = (folder / "000002.png").read_bytes()
    (folder / "000002.png").write_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (9, 8)).save(buf, format="PNG")
    (folder / "000003.png").write_bytes(buf.getvalue())


def _assert_equal_to(folder, clean):
    assert _pngs(folder) == _pngs(clean)
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(np.load(folder / "samples.npz")[key], np.load(clean / "samples.npz")[key])


def test_png_problem_says_what_is_wrong(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    assert png_problem(path, (8, 8)) is None
    assert png_problem(path, (16, 16)) == "8x8 pixels, expected 16x16"
    path.write_bytes(b"")
    assert png_problem(path, (8, 8)).startswith("does not decode")
    assert png_problem(tmp_path / "none.png", (8, 8)) == "missing"


def test_damaged_pngs_in_a_resumed_folder_are_made_again(compose_sample, tmp_path, clean_run, caplog):
    run_from_config(compose_sample(*DIGITS, "num_samples=6"), tmp_path)
    _damage(tmp_path)
    kept = {k: (tmp_path / f"{k:06d}.png").stat().st_mtime_ns for k in (0, 1, 4)}
    with caplog.at_level(logging.WARNING, logger="runs.resume"):
        metrics = run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    assert metrics["num_generated"] == 5  # 2, 3, 5 made again, 6 and 7 new
    assert {k: (tmp_path / f"{k:06d}.png").stat().st_mtime_ns for k in (0, 1, 4)} == kept  # sound ones untouched
    warned = caplog.text
    assert "000005.png: does not decode" in warned and "000002.png: does not decode" in warned
    assert "000003.png: 9x8 pixels, expected 8x8" in warned
    _assert_equal_to(tmp_path, clean_run)


def test_a_done_folder_with_a_damaged_png_is_repaired(compose_sample, tmp_path, clean_run):
    run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    _damage(tmp_path)  # after the done marker: a copy gone wrong, a full disk while copying, ...
    metrics = run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    assert metrics["num_generated"] == 3  # not "nothing to do"
    _assert_equal_to(tmp_path, clean_run)
    again = run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    assert again == metrics  # now complete: nothing to do


def test_a_done_folder_with_a_damaged_npz_rebuilds_it(compose_sample, tmp_path, clean_run):
    run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    data = (tmp_path / "samples.npz").read_bytes()
    (tmp_path / "samples.npz").write_bytes(data[: len(data) // 2])
    before = _pngs(tmp_path)
    metrics = run_from_config(compose_sample(*DIGITS, "num_samples=8"), tmp_path)
    assert metrics["num_generated"] == 0 and _pngs(tmp_path) == before
    _assert_equal_to(tmp_path, clean_run)


def test_a_folder_from_before_precision_existed_resumes_as_fp32_only(compose_sample, tmp_path, clean_run):
    """samples_config.json written before the `precision` key: it ran in float32, so an fp32 run resumes
    it (to the same images) and a bf16 run is refused."""
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(clean_run, folder)
    config = json.loads((folder / "samples_config.json").read_text())
    assert config.pop("precision") == "fp32"
    (folder / "samples_config.json").write_text(json.dumps(config))
    (folder / "000006.png").unlink()
    run_from_config(compose_sample(*DIGITS, "num_samples=8"), folder)
    _assert_equal_to(folder, clean_run)
    with pytest.raises(ValueError, match="precision: folder has 'fp32', this run 'bf16'"):
        run_from_config(compose_sample(*DIGITS, "num_samples=8", "precision=bf16"), folder)
