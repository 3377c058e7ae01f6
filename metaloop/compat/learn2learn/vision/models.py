"""learn2learn's ``learn2learn.vision.models`` (implemented in :mod:`metaloop.nn.vision`), and ``get_pretrained_backbone``."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaloop.nn.vision import (
    CNN4,
    WRN28,
    CNN4Backbone,
    ConvBase,
    ConvBlock,
    LinearBlock,
    MiniImagenetCNN,
    OmniglotCNN,
    OmniglotFC,
    ResNet12,
    ResNet12Backbone,
    WRN28Backbone,
    fc_init_,
    maml_init_,
)

__all__ = [
    "get_pretrained_backbone",
    "fc_init_",
    "maml_init_",
    "LinearBlock",
    "ConvBlock",
    "ConvBase",
    "OmniglotFC",
    "OmniglotCNN",
    "MiniImagenetCNN",
    "CNN4",
    "CNN4Backbone",
    "ResNet12",
    "ResNet12Backbone",
    "WRN28",
    "WRN28Backbone",
]

# learn2learn's published weights (zenodo record 5651278): (dataset, model) -> file
_BACKBONES = {
    ("mini-imagenet", "resnet12"): "25u1gtp5.pth",
    ("mini-imagenet", "wrn28"): "m8vz9plq.pth",
    ("tiered-imagenet", "resnet12"): "126od68s.pth",
    ("tiered-imagenet", "wrn28"): "2w8u50q4.pth",
    ("cifar-fs", "cnn4"): "2mbq7efr.pth",
    ("fc100", "cnn4"): "w02f5vab.pth",
}
_ZENODO = "https://zenodo.org/record/5651278/files"
_DOWNLOAD_TIMEOUT_S = 15.0


# the backbone each published file holds, as learn2learn builds it
_ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "cnn4": lambda: CNN4Backbone(channels=3, max_pool=True),
    "resnet12": lambda: ResNet12Backbone(avg_pool=False),
    "wrn28": WRN28Backbone,
}


def get_pretrained_backbone(
    model: str, dataset: str, spec: str = "default", root: str | os.PathLike[str] = "~/data", download: bool = False
) -> nn.Module:
    """Returns learn2learn's pretrained ``model`` backbone (``cnn4``, ``resnet12``, ``wrn28``) for ``dataset``, read from ``root/pretrained_models/<dataset>/<model>.pth``.

    Weights are read with ``torch.load(weights_only=True)``, which loads tensors only. ``spec`` is
    ``"default"`` or ``"supervised"`` (the same weights, as in learn2learn).

    Raises:
        ValueError: an unknown model/dataset pair or spec.
        FileNotFoundError: the weights are absent (and ``download`` is off or failed); the message
            gives the URL and the path to put them at.
    """
    if (dataset, model) not in _BACKBONES or spec not in ("default", "supervised"):
        raise ValueError(
            f"no pretrained backbone for model={model!r}, dataset={dataset!r}, spec={spec!r}; available:"
            f" {sorted(_BACKBONES)} with spec 'default' or 'supervised'"
        )
    destination = Path(root).expanduser() / "pretrained_models" / dataset / f"{model}.pth"
    url = f"{_ZENODO}/{_BACKBONES[dataset, model]}"
    if not destination.exists():
        if download:
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    data = response.read()
                destination.write_bytes(data)
            except OSError as err:
                raise FileNotFoundError(f"could not download {url} ({err}); fetch it by hand and save it as {destination}") from err
        else:
            raise FileNotFoundError(f"pretrained weights {destination} not found; pass download=True, or fetch {url} and save it there")
    backbone = _ARCHITECTURES[model]()
    backbone.load_state_dict(torch.load(destination, map_location="cpu", weights_only=True))
    return backbone
