"""FID, Inception Score, precision/recall: the real Inception architecture with random weights
(no download), checked against pytorch-fid's own pipeline and prdc's precision/recall."""
import json
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.outputs import save_npz
from evaluation.fid import (
    Reference,
    evaluate_images,
    fid_from_features,
    inception_outputs,
    inception_score,
    load_reference,
    precision_recall,
)
from evaluation.frechet import frechet_distance, frechet_distance_to_features, gaussian_stats
from evaluation.inception import WEIGHTS_FILE, InceptionFeatures, _fid_inception


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception at 299x299 on a shared CPU: one thread is the fastest here
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A weights file in pytorch-fid's layout holding the real architecture's random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(_fid_inception("random").state_dict(), path)
    return path


def _images(n, seed, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return base.repeat(size // 4, axis=1).repeat(size // 4, axis=2)  # blocky images: varied features


def test_fid_matches_pytorch_fid_end_to_end(random_weights, tmp_path):
    """Acceptance: FID of two different sets = pytorch-fid's own pipeline (its image-file loader,
    get_activations, numpy statistics and calculate_frechet_distance) on the same weights, to 1e-6."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    a, b = _images(6, 1), _images(6, 2)
    for name, images in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for k, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / name / f"{k}.png")
    state = torch.load(random_weights, weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kw: state):
        theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[64]]).eval()
    acts = [get_activations(sorted((tmp_path / n).glob("*.png")), theirs, batch_size=3, dims=64, device="cpu")
            for n in ("a", "b")]
    expected = calculate_frechet_distance(acts[0].mean(0), np.cov(acts[0], rowvar=False),
                                          acts[1].mean(0), np.cov(acts[1], rowvar=False))
    ours = InceptionFeatures(random_weights, dims=64)
    result = evaluate_images(a, load_reference(tmp_path / "b"), ours, batch_size=4, nearest_k=2, progress=False)
    assert result["fid"] > 1e-3 and result["fid_dims"] == 64
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["fid_reference_stats"] == "reference images" and result["num_reference"] == 6


def test_fid_of_a_set_with_itself_is_zero(random_weights):
    """Acceptance: FID of a set against itself ~0 (2048-d pool features); precision = recall = 1."""
    net = InceptionFeatures(random_weights)
    a = _images(5, 3)
    same = evaluate_images(a, Reference(a), net, nearest_k=2, progress=False)
    feats, _ = inception_outputs(net, a)
    assert feats.shape == (5, 2048) and feats.std() > 1e-3  # random weights still give varied features
    assert abs(same["fid"]) < 1e-8 * np.trace(gaussian_stats(feats)[1])
    assert same["precision"] == same["recall"] == 1.0
    assert 1.0 <= same["inception_score"] < 1008


def test_frechet_maths_against_pytorch_fid():
    """Both forms of the maths (D x D, and N x N when N < D) = pytorch-fid's sqrtm formula to 1e-6."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n1, n2, d in ((300, 200, 16), (12, 30, 40)):  # full rank; rank-deficient samples
        a = rng.normal(size=(n1, d)) * rng.uniform(0.5, 2, d)
        b = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.7
        (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
        expected = calculate_frechet_distance(m1, s1, m2, s2)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance_to_features(a, m2, s2) == pytest.approx(expected, rel=1e-6)
        assert fid_from_features(a, m1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_inception_score_formula():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(20, 0.3), size=100)
    # independent: scipy's KL divergence, one split
    from scipy.stats import entropy

    marginal = probs.mean(0)
    expected = np.exp(np.mean([entropy(p, marginal) for p in probs]))
    assert inception_score(probs, splits=1)[0] == pytest.approx(expected, rel=1e-6)
    assert inception_score(np.full((50, 10), 0.1), splits=5) == pytest.approx((1.0, 0.0))   # no confidence
    assert inception_score(np.eye(10)[np.arange(40) % 10], splits=4)[0] == pytest.approx(10.0)  # sure and diverse


def test_precision_recall_matches_prdc():
    """Kynkäänniemi et al.'s k-NN manifolds: equal to the prdc package (Naeem et al. 2020's code)."""
    from prdc import compute_prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8)).astype(np.float32)
    fake = (rng.normal(size=(45, 8)) * 1.3 + 0.4).astype(np.float32)
    for k in (1, 3, 5):
        ref = compute_prdc(real, fake, nearest_k=k)
        ours = precision_recall(real, fake, k=k, chunk=7)  # chunked as for 50K sets
        assert ours["precision"] == pytest.approx(ref["precision"]) and ours["recall"] == pytest.approx(ref["recall"])
        assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    with pytest.raises(ValueError, match="nearest_k=60"):
        precision_recall(real, fake, k=60)


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    with pytest.raises(FileNotFoundError,
                       match=rf"not in {expected} and could not be downloaded.*put it at {expected}"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match=r"nope.pth not found"):
        InceptionFeatures(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"dims=100: allowed are \[64, 192, 768, 2048\]"):
        InceptionFeatures("random", dims=100)


def test_reference_npz_layouts(tmp_path):
    images = _images(4, 5)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=np.zeros(64), sigma=np.eye(64))  # ADM's reference batch keys
    ref = load_reference(tmp_path / "adm.npz")
    assert ref.images.shape == (4, 16, 16, 3) and ref.mu.shape == (64,)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid's statistics file
    assert load_reference(tmp_path / "stats.npz").images is None
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(ValueError, match=r"has keys \['images'\]: need arr_0"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        load_reference(tmp_path / "float.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_reference(tmp_path / "missing.npz")


def test_evaluate_script_adds_fid_to_metrics(random_weights, tmp_path, capsys):
    """scripts/evaluate.py RUN --reference ADM.npz: FID/IS/precision/recall into the run's metrics.json;
    the reference's own mu/sigma are used for FID (as ADM's evaluator), or recomputed on request."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parents[1] / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = tmp_path / "run"
    run.mkdir()
    save_npz(_images(4, 6), np.zeros(4, np.int64), run / "samples.npz")
    (run / "metrics.json").write_text(json.dumps({"sampling_seconds": 1.0}))
    ref_images = _images(4, 7)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=np.full(64, 0.5), sigma=np.eye(64) * 0.01)
    args = [str(run), "--reference", str(tmp_path / "ref.npz"), "--inception-weights", str(random_weights),
            "--dims", "64", "--nearest-k", "2"]
    assert script.main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["sampling_seconds"] == 1.0  # kept
    assert m["fid_reference_stats"] == "file mu/sigma" and m["num_samples"] == 4 and m["num_reference"] == 4
    assert {"fid", "inception_score", "precision", "recall"} <= set(m)
    net = InceptionFeatures(random_weights, dims=64)
    feats, _ = inception_outputs(net, _images(4, 6))
    want = frechet_distance(*gaussian_stats(feats), np.full(64, 0.5), np.eye(64) * 0.01)
    assert m["fid"] == pytest.approx(want, rel=1e-6)
    assert script.main(args + ["--reference-stats", "images"]) == 0
    assert json.loads((run / "metrics.json").read_text())["fid_reference_stats"] == "reference images"
    assert "FID" in capsys.readouterr().out
