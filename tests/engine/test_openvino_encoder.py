"""The OpenVINO encoder gives PyTorch's embedding in fp32 and records bf16 where it computes in it."""

from __future__ import annotations

import pytest
import torch

from sam4med.engine.errors import InputError
from sam4med.engine.openvino_encoder import computes_bf16
from sam4med.engine.sam_model import SamModel

from conftest import make_ellipse_image

pytest.importorskip("openvino")


def openvino_model(litemedsam: SamModel, precision: str = "fp32") -> SamModel:
    model = SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                     encoder_backend="openvino")
    model.precision = precision
    return model


def test_openvino_encoder_matches_pytorch_from_the_shared_export(litemedsam, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))
    image, _ = make_ellipse_image()
    model = openvino_model(litemedsam)
    embedding, expected = model.encode(image), litemedsam.encode(image)
    assert embedding.features.shape == expected.features.shape == (1, 256, 64, 64)
    assert float((embedding.features - expected.features).abs().max()) < 1e-4
    assert model.protocol() == litemedsam.protocol()  # the same embedding: not part of a protocol
    assert len(list((tmp_path / "onnx").glob("litemedsam-*.onnx"))) == 1  # the graph the onnx backend uses
    assert any((tmp_path / "openvino" / "f32").iterdir())  # the compiled graph, cached
    # a second model compiles from the cache and gives the same embedding
    torch.testing.assert_close(openvino_model(litemedsam).encode(image).features, embedding.features)


def test_openvino_bf16_is_kept_apart_and_recorded_as_computed(litemedsam, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM4MED_CACHE", str(tmp_path))
    image, _ = make_ellipse_image()
    fp32 = openvino_model(litemedsam).encode(image).features
    bf16_model = openvino_model(litemedsam, "bf16")
    computed = "bf16" if computes_bf16() else "fp32"
    recorded = f"bf16 (encoder on openvino in {computed}, decoder under torch autocast)"
    assert bf16_model.protocol()["precision"] == recorded
    assert bf16_model._compiled_encoder is None  # recording the protocol compiles nothing
    features = bf16_model.encode(image).features
    assert bf16_model.protocol()["precision"] == recorded
    similarity = float(torch.nn.functional.cosine_similarity(features.flatten(), fp32.flatten(), dim=0))
    if computes_bf16():  # a graph compiled for one precision must not be loaded for the other (one cache folder each)
        assert 0.99 < similarity < 1.0 and {p.name for p in (tmp_path / "openvino").iterdir()} == {"f32", "bf16"}
        torch.testing.assert_close(openvino_model(litemedsam).encode(image).features, fp32)
    else:
        assert similarity > 1 - 1e-6


def test_a_missing_openvino_or_onnx_runtime_is_one_line_when_the_model_is_made(litemedsam, monkeypatch):
    """Not at the first image's encode, where a batch run would turn it into an error row per image."""
    monkeypatch.setattr("sam4med.engine.sam_model.openvino_available", lambda: False)
    with pytest.raises(InputError, match=r"^--encoder openvino: needs OpenVINO \(pip install openvino\)$"):
        SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                 encoder_backend="openvino")
    monkeypatch.setattr("sam4med.engine.sam_model.onnx_runtime_available", lambda: False)
    for backend in ("onnx", "onnx-int8"):  # ONNX Runtime's encoders likewise
        with pytest.raises(InputError, match=rf"^--encoder {backend}: needs ONNX Runtime \(pip install onnxruntime\)$"):
            SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                     encoder_backend=backend)
