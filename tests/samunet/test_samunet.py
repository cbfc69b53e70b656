"""SAM-UNet's network on the bundled LiteMedSAM (TinyViT) backbone."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

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


def test_vit_fusion_is_before_each_global_attention_block():
    # a small random SAM ViT (no ViT weights offline): two windowed and one global block per third
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=6, num_heads=2, out_chans=64,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                              window_size=2, global_attn_indexes=(2, 5))
    prompt_encoder = PromptEncoder(embed_dim=64, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                   mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=64, transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128,
                                                                            num_heads=2))
    network = SamUNet(encoder, prompt_encoder, decoder, 64, "resnet34")
    assert network.stages.global_blocks == [2, 5]
    assert [(p.grid, p.channels) for p in network.stages.fusion_points] == [((4, 4), 32), ((4, 4), 32)]
    images = torch.randn(2, 3, 64, 64)
    embedding, multi_scale = network.encode(images)
    with torch.no_grad():
        torch.testing.assert_close(embedding, encoder(images), atol=1e-5, rtol=0)  # gates start at 0
    assert multi_scale.shape == (2, 8, 16, 16)
    logits = network.decode(embedding[:1], multi_scale[:1], boxes=torch.tensor([[8.0, 8, 40, 48]]))
    assert logits.shape == (1, 1, 16, 16)
    logits.square().mean().backward()
    assert all(fusion.gate.grad is not None and fusion.gate.grad.abs() > 0 for fusion in network.fusions)
    assert all(p.grad is None for p in encoder.parameters())
    # the registered SAM ViT-B (random weights): the paper's fusion points, blocks 2, 5, 8 and 11
    from sam4med.engine.registry import MODELS
    from sam4med.samunet.model import encoder_stages

    vit_b = encoder_stages(MODELS["sam_vit_b"].build().image_encoder)
    assert vit_b.global_blocks == [2, 5, 8, 11]
    assert [(p.grid, p.channels) for p in vit_b.fusion_points] == [((64, 64), 768)] * 4


def test_warm_start_segments_as_the_backbone_before_training(samunet, litemedsam, ellipse_image):
    image, mask = ellipse_image
    images, geometry = litemedsam.preprocess(image)
    ys, xs = mask.nonzero()
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32) * geometry.scale_xy[0]
    network = litemedsam.network
    with torch.no_grad():
        embedding, multi_scale = samunet.encode(images)
        warm = samunet.decode(embedding, multi_scale, boxes=box)[0, 0] > 0
        sparse, dense = network.prompt_encoder(points=None, boxes=box, masks=None)
        own, _ = network.mask_decoder(image_embeddings=embedding, image_pe=network.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        torch.manual_seed(0)
        cold_network = copy.deepcopy(network)
        cold = SamUNet(cold_network.image_encoder, cold_network.prompt_encoder, cold_network.mask_decoder, 256,
                       "resnet34", warm_start=False)
        cold_mask = cold.decode(*cold.encode(images), boxes=box)[0, 0] > 0
    backbone = own[0, 0] > 0
    assert backbone.sum() > 1000  # the backbone finds the ellipse

    def agreement(a, b):
        return 2 * (a & b).sum().item() / (a.sum() + b.sum()).item()

    assert agreement(warm, backbone) > 0.95  # only the extra context token differs
    assert agreement(cold_mask, backbone) < 0.9  # a fresh token starts from scratch


def test_unknown_conv_branch_is_refused(litemedsam):
    network = copy.deepcopy(litemedsam.network)
    with pytest.raises(InputError, match="--conv-branch 'vgg'"):
        SamUNet(network.image_encoder, network.prompt_encoder, network.mask_decoder, 256, "vgg")


def _ellipse_dataset(root, count=6, size=96, name="ellipses"):
    import json

    import numpy as np
    from PIL import Image

    from conftest import make_ellipse_image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        centre = tuple(int(v) for v in rng.integers(30, size - 30, 2))
        image, mask = make_ellipse_image(size, size, centre, (int(rng.integers(10, 20)), int(rng.integers(10, 20))),
                                         seed=index)
        Image.fromarray(image).save(root / "images" / f"e{index}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"e{index}.png")
    (root / "dataset.json").write_text(json.dumps({"name": name}))
    return root


def test_comparison_trains_both_methods_and_scores_three_rows(tmp_path):
    import pandas as pd

    from sam4med.engine.imageio import read_image
    from sam4med.engine.models import load_model
    from sam4med.engine.predictor import Predictor
    from sam4med.engine.prompts import Prompt
    from sam4med.samunet.comparison import paired_gain, run_comparison
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    data = _ellipse_dataset(tmp_path / "ellipses")
    config = PromptTrainConfig(epochs=1, images_per_step=2, masks_per_image=1,
                               fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    # two images have no three-way split: a left-out set is scored on all its images instead
    left_out = _ellipse_dataset(tmp_path / "left_out", count=2, name="unseen")
    table = run_comparison([data], [left_out], tmp_path / "cmp", config, show_progress=False)
    in_domain = table[table["setting"] == "in_domain"]
    assert sorted(in_domain["row"]) == ["decoder", "samunet", "zero_shot"] and (in_domain["count"] > 0).all()
    unseen = table[table["setting"] == "left_out"]
    assert set(unseen["dataset"]) == {"unseen"} and (unseen["count"] == 2).all() and len(unseen) == 3
    assert (unseen["images"] == 2).all() and (in_domain["images"] <= in_domain["count"]).all()
    zero_shot = in_domain.set_index("row").loc["zero_shot", "mean"]
    assert zero_shot > 0.8  # LiteMedSAM segments clean ellipses from their boxes
    scores = pd.read_csv(tmp_path / "cmp" / "scores.csv")
    gain = paired_gain(scores, "decoder").set_index("setting")
    assert len(gain) == 2 and gain.loc["in_domain", "count"] == in_domain["count"].iloc[0]
    protocol = json.loads((tmp_path / "cmp" / "protocol.json").read_text())
    runs = protocol["runs"]
    assert runs["samunet"]["epochs_done"] == 1 and runs["decoder"]["config"]["method"] == "decoder"
    assert runs["samunet"]["config"]["warm_start"] and protocol["arms"]["samunet"]["warm_start"]
    with Image.open(tmp_path / "cmp" / "curves.png") as curves:
        assert curves.size[0] > 500
    with pytest.raises(InputError, match="arms samunet_warm: choose from decoder, samunet, samunet_cold"):
        run_comparison([data], [], tmp_path / "typo", config, show_progress=False, arms=("samunet_warm",))
    assert not (tmp_path / "typo").exists()
    # scoring the trained runs again, without training, gives the same table; scoring resumes on the item loop
    # (hours on a CPU for every left-out image): an image's rows lost with a kill are scored again, the rest kept
    scoring = sorted((tmp_path / "cmp" / "scoring").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in scoring] == ["decoder", "samunet", "zero_shot"]
    results = scoring[0] / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    last_image = json.loads(lines[-1])["image"]
    kept = [line for line in lines if json.loads(line)["image"] != last_image]
    results.write_bytes(b"".join(kept) + b'{"dataset": "cut short')  # a kill while the last image was written
    again = run_comparison([data], [left_out], tmp_path / "cmp", config, show_progress=False, train=False)
    pd.testing.assert_frame_equal(again.sort_values(list(again.columns)).reset_index(drop=True),
                                  table.sort_values(list(table.columns)).reset_index(drop=True))
    assert results.read_bytes().splitlines(keepends=True)[: len(kept)] == kept  # the finished images were kept
    with pytest.raises(InputError, match="no best.pt"):
        run_comparison([data], [], tmp_path / "empty", config, show_progress=False, train=False)

    for method in ("decoder", "samunet"):
        run = tmp_path / "cmp" / method
        assert train_promptable([data], run, replace(config, method=method), show_progress=False).epochs_run == 1
        model = load_model("litemedsam", run / "best.pt", device="cpu")
        assert model.name == f"litemedsam+{method}"
        predictor = Predictor(model)
        predictor.set_image(read_image(data / "images" / "e0.png"))
        assert predictor.predict([Prompt(box=[10.0, 10, 80, 80])]).masks().shape == (1, 1, 96, 96)
    with pytest.raises(InputError, match="not 'medsam'"):
        load_model("medsam", tmp_path / "cmp" / "samunet" / "best.pt")


def test_a_refused_backbone_leaves_no_run_folder_behind(tmp_path):
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    data = _ellipse_dataset(tmp_path / "ellipses")
    with pytest.raises(InputError, match="ships no weights"):
        train_promptable([data], tmp_path / "run", PromptTrainConfig(backbone="medsam"), show_progress=False)
    assert not (tmp_path / "run").exists()  # the corrected command may use the same --out


def test_every_unusable_training_file_is_named_in_one_error_before_anything_is_written(tmp_path):
    """A set with several bad files is mended in one pass, not one run per file."""
    from sam4med.engine.datasets import load_dataset
    from sam4med.engine.splits import training_split
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    data = _ellipse_dataset(tmp_path / "ellipses", count=12)
    config = PromptTrainConfig(epochs=1)
    sides = training_split(load_dataset(data), config.fractions, config.split_seed)
    train_side, val_side = sides["train"][0].id, sides["val"][0].id
    (data / "masks" / f"{train_side}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    (data / "images" / f"{val_side}.png").write_text("not an image")
    Image.new("L", (40, 96)).save(data / "masks" / f"{sides['train'][1].id}.png")  # another size than its image
    (data / "masks" / f"{sides['test'][0].id}.png").write_text("not read: the test side is not the trainer's")
    with pytest.raises(InputError) as refused:
        train_promptable([data], tmp_path / "run", config, show_progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.count("unusable too:") == 1
    named = [f"masks/{train_side}.png", f"images/{val_side}.png", f"masks/{sides['train'][1].id}.png"]
    assert all(name in message for name in named) and f"masks/{sides['test'][0].id}.png" not in message, message
    assert not (tmp_path / "run").exists()


def test_decoder_fine_tuning_keeps_each_frozen_embedding_and_trains_exactly_as_when_it_encodes_every_step(
        tmp_path, monkeypatch):
    """The frozen encoder is run once per image and autocast type; the weights are those of a run that encodes
    each image in every step, bf16 training steps and fp32 validation included."""
    from sam4med.engine.checkpoints import read_trained_checkpoint
    from sam4med.samunet import training
    from sam4med.samunet.training import PromptTrainConfig, train_promptable

    data = _ellipse_dataset(tmp_path / "ellipses", count=6)
    config = PromptTrainConfig(method="decoder", epochs=2, images_per_step=2, masks_per_image=1, precision="bf16",
                               fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    encoded = []  # (image, autocast on) of each call that ran the encoder
    original = training.DecoderFineTune.encode

    def counted(self, images, key=None):
        before = len(self.embeddings)
        result = original(self, images, key)
        if len(self.embeddings) > before or not training.FROZEN_EMBEDDINGS_BYTES:
            encoded.append((key, torch.is_autocast_enabled("cpu")))
        return result

    monkeypatch.setattr(training.DecoderFineTune, "encode", counted)
    kept = train_promptable([data], tmp_path / "kept", config, show_progress=False)
    images = json.loads((tmp_path / "kept" / "split.json").read_text())["ellipses"]
    assert sorted(encoded) == sorted([(data / "images" / f"{i}.png", True) for i in images["train"]]
                                     + [(data / "images" / f"{i}.png", False) for i in images["val"]])
    monkeypatch.setattr(training, "FROZEN_EMBEDDINGS_BYTES", 0)
    encoded.clear()
    every_step = train_promptable([data], tmp_path / "every_step", config, show_progress=False)
    assert len(encoded) == 2 * (len(images["train"]) + len(images["val"]))  # nothing kept: every image, every epoch
    assert (kept.best_val_dice, kept.best_epoch) == (every_step.best_val_dice, every_step.best_epoch)
    a = read_trained_checkpoint(tmp_path / "kept" / "last.pt", "promptable")["weights"]
    b = read_trained_checkpoint(tmp_path / "every_step" / "last.pt", "promptable")["weights"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["decoder", "samunet"])
def test_training_mode_leaves_the_frozen_encoder_computing_as_at_inference(litemedsam, ellipse_image, method):
    """TinyViT has BatchNorm layers: in training mode they would normalise by each step's images and move
    their running statistics, so the decoder would learn on embeddings that inference never gives."""
    import types

    from sam4med.samunet.training import DecoderFineTune, SamUNetTrainable

    backbone = types.SimpleNamespace(network=copy.deepcopy(litemedsam.network), spec=litemedsam.spec)
    module = DecoderFineTune(backbone) if method == "decoder" else SamUNetTrainable(backbone, "resnet34", True)
    encoder = backbone.network.image_encoder
    statistics = {name: value.clone() for name, value in encoder.named_buffers()}
    assert any("running_mean" in name for name in statistics)
    images, _ = litemedsam.preprocess(ellipse_image[0])
    with torch.no_grad():
        expected = litemedsam.network.image_encoder(images)
    module.train()
    assert not any(m.training for m in encoder.modules())
    if method == "samunet":
        assert module.net.conv_branch.training and module.net.fusions.training  # what is trained still trains
    embedding, _ = module.encode(images)
    torch.testing.assert_close(embedding.detach(), expected)  # the warm start's closed gates add nothing yet
    for name, value in encoder.named_buffers():
        torch.testing.assert_close(value, statistics[name], rtol=0, atol=0)
