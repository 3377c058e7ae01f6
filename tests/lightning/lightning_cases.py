"""Small modules and task sources shared by the Lightning tests."""

from __future__ import annotations

import functools

import torch

from learner_options import with_inner
from metaloop.lightning import MLP, Classification, Conv4, MetaLightningModule, Regression
from metaloop.tasks import EpisodeSampler, SinusoidTasks, Task, sample_meta_batch


def sinusoid_module(**kwargs) -> MetaLightningModule:
    """Returns a MAML module for sinusoid regression on a small MLP (1-8-8-1), seeded."""
    torch.manual_seed(0)
    options = {"inner_optim": functools.partial(torch.optim.SGD, lr=0.05), "outer_optim": functools.partial(torch.optim.SGD, lr=0.1)}
    options.update(kwargs)
    model = options.pop("model", None) or MLP([1, 8, 8, 1])
    return MetaLightningModule(model, options.pop("objective", Regression()), **with_inner(options))


def sinusoid_batch(tasks: int = 4, k: int = 5) -> Task:
    """Returns a meta-batch of sinusoid tasks with ``k`` support and ``k`` query points each."""
    return sample_meta_batch(SinusoidTasks(k, k), "train", 0, range(tasks))


class TinyImages(torch.utils.data.TensorDataset):
    """60 classes of 6 random 16x16 'images' (uint8), 9 per validation and test split, enough for 7-way episodes, made in memory."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        prototypes = torch.rand(60, 1, 16, 16, generator=generator)
        noise = 0.3 * torch.rand(60, 6, 1, 16, 16, generator=generator)
        images = ((prototypes[:, None] + noise).clamp(0, 1) * 255).to(torch.uint8).flatten(0, 1)
        super().__init__(images, torch.arange(60).repeat_interleave(6))


def image_tasks(n_ways: int = 5) -> EpisodeSampler:
    return EpisodeSampler(TinyImages(), n_ways=n_ways, k_shots=1, k_queries=2)


def conv_module(n_ways: int = 5, **kwargs) -> MetaLightningModule:
    """Returns a MAML module with a small Conv4 (8 filters) for 16x16 images."""
    torch.manual_seed(0)
    options = {"inner_optim": functools.partial(torch.optim.SGD, lr=0.4), "outer_optim": functools.partial(torch.optim.Adam, lr=1e-3)}
    options.update(kwargs)
    return MetaLightningModule(Conv4(n_ways, hidden=8, image_size=16), Classification(), **with_inner(options))
