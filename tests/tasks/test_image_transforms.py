"""metaloop.tasks.image_transforms: plain-torch image transforms against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metaloop.tasks.image_transforms import ColorJitter, Compose, Normalize, RandomCrop, RandomHorizontalFlip, ToTensor, rotate


def test_to_tensor_of_pil_and_arrays():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = ToTensor()(Image.fromarray(rgb))
    assert x.shape == (3, 2, 3) and torch.allclose(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    gray = ToTensor()(Image.fromarray(np.full((4, 5), 51, np.uint8)))
    assert gray.shape == (1, 4, 5) and torch.allclose(gray, torch.full((1, 4, 5), 0.2))
    t = torch.rand(3, 2, 2)
    assert ToTensor()(t) is t


def test_normalize_and_compose():
    x = torch.rand(3, 4, 4)
    out = Compose([Normalize([0.1, 0.2, 0.3], [0.5, 1.0, 2.0]), lambda v: v * 2])(x)
    expected = (x - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.5, 1.0, 2.0])[:, None, None] * 2
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="std"):
        Normalize([0.0], [0.0])


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.arange(1, 1 + 3 * 6 * 6, dtype=torch.float32).view(3, 6, 6)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for _ in range(50):
        crop = RandomCrop(6, padding=2)(x)
        assert crop.shape == (3, 6, 6)
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[:, i : i + 6, j : j + 6], crop)]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10
    with pytest.raises(ValueError, match="size=20"):
        RandomCrop(20)(x)


def test_horizontal_flip():
    x = torch.rand(3, 2, 4)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1)) and torch.equal(RandomHorizontalFlip(p=0.0)(x), x)


def test_color_jitter_each_factor_matches_its_formula(monkeypatch):
    x = torch.rand(3, 4, 4)
    gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    monkeypatch.setattr(torch, "randperm", lambda n: torch.arange(n))
    torch.manual_seed(1)
    factors = [float(torch.empty(()).uniform_(0.6, 1.4)) for _ in range(3)]
    torch.manual_seed(1)
    out = ColorJitter(0.4, 0.4, 0.4)(x)
    b = (factors[0] * x).clamp(0, 1)
    gb = (0.299 * b[0] + 0.587 * b[1] + 0.114 * b[2]).mean()
    c = (factors[1] * b + (1 - factors[1]) * gb).clamp(0, 1)
    gc = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    expected = (factors[2] * c + (1 - factors[2]) * gc).clamp(0, 1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(ColorJitter()(x), x)
    assert gray.shape == (4, 4)


@pytest.mark.parametrize("degrees", [90, 180, 270, 45])
def test_rotate_tensors_as_pil_does(degrees):
    pixels = np.zeros((7, 7), np.uint8)
    pixels[1, 5] = pixels[2, 3] = 255
    expected = np.asarray(Image.fromarray(pixels).rotate(degrees))
    out = rotate(torch.from_numpy(pixels)[None].float(), degrees)[0].numpy()
    assert np.array_equal(out.astype(np.uint8), expected)
    pil = rotate(Image.fromarray(pixels), degrees)
    assert np.array_equal(np.asarray(pil), expected)
