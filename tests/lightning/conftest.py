"""Fixtures for the Lightning tests: one CPU thread (tiny models on a shared machine), small task sources."""

from __future__ import annotations

import functools

import pytest
import torch

from metaloop.lightning import MLP, Classification, Conv4, MetaLightningModule, Regression
from metaloop.tasks import EpisodeSampler, SinusoidTasks, Task, sample_meta_batch


@pytest.fixture(autouse=True)
def one_thread():
    """Runs each test on one intra-op thread: small models are faster so, and other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sinusoid_module(**kwargs) -> MetaLightningModule:
    """Returns a MAML module for sinusoid regression on a small MLP (1-8-8-1), seeded."""
    torch.manual_seed(0)
    options = {"inner_optim": functools.partial(torch.optim.SGD, lr=0.05), "outer_optim": functools.partial(torch.optim.SGD, lr=0.1)}
    options.update(kwargs)
    model = options.pop("model", None) or MLP([1, 8, 8, 1])
    return MetaLightningModule(model, options.pop("objective", Regression()), **options)


def sinusoid_batch(tasks: int = 4, k: int = 5) -> Task:
    """Returns a meta-batch of sinusoid tasks with ``k`` support and ``k`` query points each."""
    return sample_meta_batch(SinusoidTasks(k, k), "train", 0, range(tasks))


class TinyImages(torch.utils.data.TensorDataset):
    """30 classes of 6 random 16x16 'images' (uint8), enough for 5-way episodes, made in memory."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        prototypes = torch.rand(30, 1, 16, 16, generator=generator)
        noise = 0.3 * torch.rand(30, 6, 1, 16, 16, generator=generator)
        images = ((prototypes[:, None] + noise).clamp(0, 1) * 255).to(torch.uint8).flatten(0, 1)
        super().__init__(images, torch.arange(30).repeat_interleave(6))


def image_tasks(n_ways: int = 5) -> EpisodeSampler:
    return EpisodeSampler(TinyImages(), n_ways=n_ways, k_shots=1, k_queries=2)


def conv_module(n_ways: int = 5, **kwargs) -> MetaLightningModule:
    """Returns a MAML module with a small Conv4 (8 filters) for 16x16 images."""
    torch.manual_seed(0)
    options = {"inner_optim": functools.partial(torch.optim.SGD, lr=0.4), "outer_optim": functools.partial(torch.optim.Adam, lr=1e-3)}
    options.update(kwargs)
    return MetaLightningModule(Conv4(n_ways, hidden=8, image_size=16), Classification(), **options)
