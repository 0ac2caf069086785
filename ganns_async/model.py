"""The DCGAN of the model card: a 64x64 RGB generator and discriminator.

Parameter names (``main.N.weight``) match the model card's loading snippet, so
``checkpoint['generator_state_dict']`` loads into the card's own ``Generator``.

``Generator`` is also a Hugging Face Hub model (``PyTorchModelHubMixin``): the
coordinator's ``OUT/generator/`` folder, and the Hub repository it pushes, load with
``Generator.from_pretrained(FOLDER_OR_REPO)`` (``config.json`` holds the constructor's
arguments, ``model.safetensors`` the weights, never a pickle).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

LATENT_DIM = 100
NUM_CHANNELS = 3
FEATURE_MAPS = 64
IMAGE_SIZE = 64


HUB_TAGS = ["pytorch", "gan", "dcgan", "image-generation", "celeba", "educational", "distributed-training"]


class Generator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="ganns-async",
    pipeline_tag="unconditional-image-generation",
    license="mit",
    tags=list(HUB_TAGS),
    paper_url="https://arxiv.org/abs/1511.06434",
):
    """z (N x latent_dim x 1 x 1) -> images (N x num_channels x 64 x 64) in [-1, 1]."""

    def __init__(self, latent_dim: int = LATENT_DIM, num_channels: int = NUM_CHANNELS,
                 feature_maps: int = FEATURE_MAPS) -> None:
        super().__init__()
        f = feature_maps
        self.main = nn.Sequential(
            # input: latent_dim x 1 x 1
            nn.ConvTranspose2d(latent_dim, f * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(f * 8),
            nn.ReLU(True),
            # state size: (f*8) x 4 x 4
            nn.ConvTranspose2d(f * 8, f * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f * 4),
            nn.ReLU(True),
            # state size: (f*4) x 8 x 8
            nn.ConvTranspose2d(f * 4, f * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f * 2),
            nn.ReLU(True),
            # state size: (f*2) x 16 x 16
            nn.ConvTranspose2d(f * 2, f, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f),
            nn.ReLU(True),
            # state size: f x 32 x 32
            nn.ConvTranspose2d(f, num_channels, 4, 2, 1, bias=False),
            nn.Tanh(),
            # output: num_channels x 64 x 64, in [-1, 1]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self, num_channels: int = NUM_CHANNELS, feature_maps: int = FEATURE_MAPS) -> None:
        super().__init__()
        f = feature_maps
        self.main = nn.Sequential(
            # input: num_channels x 64 x 64
            # no BatchNorm on the input layer (DCGAN paper, PyTorch tutorial)
            nn.Conv2d(num_channels, f, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size: f x 32 x 32
            nn.Conv2d(f, f * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size: (f*2) x 16 x 16
            nn.Conv2d(f * 2, f * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size: (f*4) x 8 x 8
            nn.Conv2d(f * 4, f * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(f * 8),
            nn.LeakyReLU(0.2, inplace=True),
            # state size: (f*8) x 4 x 4
            nn.Conv2d(f * 8, 1, 4, 1, 0, bias=False),
            # output: 1 x 1 x 1, a logit (BCEWithLogitsLoss applies the sigmoid)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def build_models(seed: int, feature_maps: int = FEATURE_MAPS) -> tuple[Generator, Discriminator]:
    """Fresh networks with DCGAN initialisation (conv weights N(0, 0.02), BatchNorm
    gamma N(1, 0.02), beta 0), drawn from a CPU generator so the same seed gives
    the same weights on any machine. ``feature_maps``: the width (the DCGAN paper's ngf
    and ndf); the model card's model is 64."""
    gen = torch.Generator().manual_seed(seed)
    g, d = Generator(feature_maps=feature_maps), Discriminator(feature_maps=feature_maps)
    for net in (g, d):
        for module in net.modules():
            name = module.__class__.__name__
            if "Conv" in name:
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
            elif "BatchNorm" in name:
                with torch.no_grad():
                    module.weight.copy_(1.0 + torch.randn(module.weight.shape, generator=gen) * 0.02)
                    module.bias.zero_()
    return g, d


def feature_maps_of(generator_state: Mapping[str, torch.Tensor]) -> int | None:
    """The width of the generator these weights belong to (its first layer maps the latent
    vector to 8 x feature_maps channels), or None when they are not a generator's."""
    first = generator_state.get("main.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 4 or first.shape[1] % 8:
        return None
    return int(first.shape[1]) // 8


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
