"""The optional ONNX Runtime encoder gives PyTorch's embedding."""

from __future__ import annotations

import pytest
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.models import load_model
from sam4med.engine.sam_model import SamModel

from conftest import make_ellipse_image


def test_onnx_encoder_matches_pytorch_and_is_exported_once(litemedsam, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))
    image, _ = make_ellipse_image()
    onnx_model = SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                          encoder_backend="onnx")
    embedding = onnx_model.encode(image)
    expected = litemedsam.encode(image)
    assert embedding.features.shape == expected.features.shape == (1, 256, 64, 64)
    assert float((embedding.features - expected.features).abs().max()) < 1e-4
    exported = list((tmp_path / "onnx").glob("litemedsam-*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    again = SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                     encoder_backend="onnx")
    torch.testing.assert_close(again.encode(image).features, embedding.features)
    assert exported[0].stat().st_mtime_ns == stamp  # reused, not exported again


def test_unknown_backend_is_refused():
    with pytest.raises(InputError, match="--encoder 'tensorrt'"):
        load_model("litemedsam", device="cpu", encoder_backend="tensorrt")


def test_int8_encoder_is_a_recorded_backend(litemedsam, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))
    image, _ = make_ellipse_image()
    int8 = SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                    encoder_backend="onnx-int8")
    features, expected = int8.encode(image).features, litemedsam.encode(image).features
    assert 0.97 < float(torch.nn.functional.cosine_similarity(features.flatten(), expected.flatten(), dim=0)) < 1.0
    assert int8.protocol()["encoder"].startswith("onnx-int8") and "encoder" not in litemedsam.protocol()
    assert sorted(p.name.endswith("-int8.onnx") for p in (tmp_path / "onnx").glob("*.onnx")) == [False, True]
