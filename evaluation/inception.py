"""pytorch-fid's Inception network (the port of the 2015 TensorFlow graph FID is defined with).

The network is pytorch-fid's own (`pytorch_fid.inception`): its architecture, its input
handling (bilinear resize to 299x299, inputs scaled to [-1, 1]) and its weights file
`pt_inception-2015-12-05-6726825d.pth`. Only where the weights come from is ours:

* a local file (`weights=/path/to/pt_inception-2015-12-05-6726825d.pth`),
* else torch hub's cache, `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`),
  where pytorch-fid itself keeps it, downloaded there when online;
* `weights="random"`: the real architecture with random weights (tests; no download).

One forward gives both what FID and precision/recall use (the 2048-d pool features, or the
pooled output of an earlier block for pytorch-fid's `dims` 64/192/768) and what the Inception
Score uses (the softmax over the graph's 1008 outputs, from its final layer).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import MissingFileError, UserError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid's feature sizes and the block each is the (pooled) output of
DIMS_TO_BLOCK = {64: 0, 192: 1, 768: 2, 2048: 3}


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _state_dict(weights: str | Path | None):
    """The weights file's state dict: a given path, else the hub cache, else a download (online)."""
    import pytorch_fid.inception as pfi

    path = Path(weights) if weights is not None else default_weights_path()
    if weights is not None and not path.is_file():
        raise MissingFileError(f"Inception weights {path} not found: give the path of {WEIGHTS_FILE} "
                                f"(from {pfi.FID_WEIGHTS_URL})")
    if path.is_file():
        from diffusion.checkpoint_files import check_finite, read_torch_file

        state = read_torch_file(path)
        check_finite(state, path)
        return state
    try:
        return torch.hub.load_state_dict_from_url(pfi.FID_WEIGHTS_URL, progress=True, map_location="cpu")
    except Exception as err:  # offline: URLError, or any failure of the download
        raise MissingFileError(
            f"the FID Inception weights are not in {path} and could not be downloaded ({type(err).__name__}: {err}). "
            f"Download {pfi.FID_WEIGHTS_URL} on a machine with internet and put it at {path} "
            f"(or anywhere, and pass evaluate.inception_weights=PATH / --inception-weights PATH)") from err


def check_inception_weights(weights: str | Path | None, key: str = "inception_weights") -> None:
    """Before any sampling: the weights file reads (safely), holds finite values and fits pytorch-fid's
    network. weights=None fetches the file into torch hub's cache now when it is not there, so a
    failed download stops the run before sampling rather than after. "random" needs nothing."""
    import pytorch_fid.inception as pfi

    from diffusion.checkpoint_files import checkpoint_setting
    from diffusion.errors import UserError

    if weights == "random":
        return
    try:
        with checkpoint_setting(key):
            state = _state_dict(weights)
    except FileNotFoundError as err:
        raise UserError.setting(key, weights, str(err)) from None
    try:  # the real architecture on `meta`: key and shape checks, no memory, no init time
        with torch.device("meta"), mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op": what we want here
            pfi.fid_inception_v3()
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise UserError.setting(key, weights if weights is not None else default_weights_path(),
                                f"not pytorch-fid's Inception weights ({WEIGHTS_FILE}): "
                                + " ".join(lines[1:3])[:300]) from None


def _fid_inception(weights: str | Path | None) -> nn.Module:
    """pytorch-fid's full FID Inception (blocks and final 1008-way layer) with the chosen weights."""
    import pytorch_fid.inception as pfi

    if weights == "random":
        built = []
        real = pfi._inception_v3

        def capture(*args, **kwargs):
            built.append(real(*args, **kwargs))
            return built[-1]

        # pytorch-fid builds the network, then loads its weights file into it: hand it its own
        # (random) state instead, so no file is read and nothing is downloaded
        with mock.patch.object(pfi, "_inception_v3", capture), \
                mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict()):
            net = pfi.fid_inception_v3()
        # He-normal convolutions keep the activations' scale through the ~100 layers (the default
        # inits shrink them to ~1e-8 at the pool), so random features are not all alike
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return net
    state = _state_dict(weights)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.fid_inception_v3()


class InceptionFeatures(nn.Module):
    """uint8 images (N, H, W, 3) -> (features (N, dims), probabilities (N, 1008)), float64 on the CPU."""

    def __init__(self, weights: str | Path | None = None, dims: int = 2048):
        super().__init__()
        import pytorch_fid.inception as pfi

        if dims not in DIMS_TO_BLOCK:
            raise UserError(f"dims={dims}: allowed are {sorted(DIMS_TO_BLOCK)} (pytorch-fid's feature sizes)")
        self.dims = dims
        full = _fid_inception(weights)
        # pytorch-fid's own wrapper (resize to 299, scale to [-1, 1], its block split) around that network
        with mock.patch.object(pfi, "fid_inception_v3", lambda: full):
            self.blocks = pfi.InceptionV3(sorted({DIMS_TO_BLOCK[dims], 3}), resize_input=True,
                                          normalize_input=True, use_fid_inception=True)
        self.fc = full.fc  # 2048 -> 1008 logits (the TF graph's softmax layer)
        self.eval()

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_uint8.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1], as pytorch-fid feeds it
        outs = self.blocks(x)  # one tensor per requested block, (N, C, h, w)
        pool = outs[-1].flatten(1)  # (N, 2048): block 3 ends with global average pooling
        feats = outs[0] if self.dims != 2048 else outs[-1]
        if feats.shape[2:] != (1, 1):
            feats = F.adaptive_avg_pool2d(feats, (1, 1))  # as pytorch-fid's fid_score does for dims < 2048
        probs = F.softmax(self.fc(pool), dim=1)
        return feats.flatten(1).double().cpu(), probs.double().cpu()
