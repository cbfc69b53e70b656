"""SAM-UNet's network on the bundled LiteMedSAM (TinyViT) backbone."""

from __future__ import annotations

import copy

import pytest
import torch

from sam4med.engine.errors import InputError
from sam4med.samunet.model import SamUNet


@pytest.fixture(scope="module")
def samunet(litemedsam) -> SamUNet:
    network = copy.deepcopy(litemedsam.network)  # SamUNet freezes the encoder it is given
    return SamUNet(network.image_encoder, network.prompt_encoder, network.mask_decoder, 256, "resnet34")


def test_tinyvit_fusion_points_are_its_transformer_stages(samunet):
    points = samunet.stages.fusion_points
    assert [(p.grid, p.channels) for p in points] == [((128, 128), 128), ((64, 64), 160), ((64, 64), 320)]
    assert len(samunet.bridges) == 2


def test_closed_gates_give_the_backbone_embedding_and_gradients_reach_the_conv_branch(samunet, litemedsam):
    images = torch.randn(1, 3, 256, 256)
    embedding, multi_scale = samunet.encode(images)
    with torch.no_grad():
        backbone = litemedsam.network.image_encoder(images)
    torch.testing.assert_close(embedding, backbone, atol=1e-5, rtol=0)  # gates start at 0
    assert multi_scale.shape == (1, 32, 256, 256)
    logits = samunet.decode(embedding, multi_scale, boxes=torch.tensor([[40.0, 50, 180, 200], [10, 10, 90, 80]]))
    assert logits.shape == (2, 1, 256, 256)
    logits.square().mean().backward()
    assert all(fusion.gate.grad is not None and fusion.gate.grad.abs() > 0 for fusion in samunet.fusions)
    assert all(p.grad is None for p in samunet.stages.parameters())  # the SAM encoder stays frozen
    assert samunet.mask_decoder.output_token.weight.grad.abs().sum() > 0
    assert samunet.prompt_encoder.point_embeddings[2].weight.grad.abs().sum() > 0  # box corner embedding


def test_unknown_conv_branch_is_refused(litemedsam):
    network = copy.deepcopy(litemedsam.network)
    with pytest.raises(InputError, match="--conv-branch 'vgg'"):
        SamUNet(network.image_encoder, network.prompt_encoder, network.mask_decoder, 256, "vgg")
