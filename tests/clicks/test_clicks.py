"""Click training: it learns clicks on a small synthetic set, resumes exactly, and exports weights that
load as a model; the shipped weights are hash-checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_ellipse_image
from PIL import Image

from sam4med.clicks.loading import export_prompt_weights
from sam4med.clicks.training import ClickTrainConfig, train_clicks
from sam4med.engine.errors import InputError
from sam4med.engine.models import WEIGHTS_DIR, load_model, load_prompt_weights
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, center_point
from sam4med.engine.registry import MODELS, model_spec
from sam4med.engine.segment import segment_image


def ellipses(root: Path, count: int = 10, size: int = 128) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        centre = tuple(int(v) for v in rng.integers(40, size - 40, 2))
        image, mask = make_ellipse_image(size, size, centre, tuple(int(v) for v in rng.integers(14, 30, 2)), seed=index)
        Image.fromarray(image).save(root / "images" / f"e{index}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"e{index}.png")
    (root / "dataset.json").write_text(json.dumps({"name": "ellipses"}))
    return root


def one_click_dice(model, data: Path) -> float:
    predictor = Predictor(model)
    scores = []
    for path in sorted((data / "images").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        truth = np.asarray(Image.open(data / "masks" / path.name)) > 0
        mask = segment_image(predictor, image, Prompt(points=[center_point(truth)]), "auto")
        scores.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    return float(np.mean(scores))


CONFIG = ClickTrainConfig(steps_per_epoch=6, epochs=3, rounds=1, images_per_step=2, objects_per_image=1,
                          learning_rate=3e-4, max_val_images=2, flips=False,
                          fractions={"train": 0.6, "val": 0.2, "test": 0.2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clicks")
    data = ellipses(root / "ellipses")
    result = train_clicks([data], root / "run", CONFIG, show_progress=False)
    return data, root / "run", result


def test_a_few_dozen_steps_teach_the_decoder_single_clicks(trained, litemedsam):
    data, run, result = trained
    assert result.epochs_run == 3
    before = one_click_dice(litemedsam, data)
    after = one_click_dice(load_model("litemedsam", run / "best.pt", device="cpu"), data)
    assert before < 0.3  # LiteMedSAM ignores a lone click
    assert after > before + 0.4, (before, after)


def test_embeddings_are_cached_in_fp16_once(trained):
    _, run, _ = trained
    rows = [json.loads(line) for line in (run / "embeddings" / "ellipses" / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" and r["objects"] == 1 for r in rows)
    saved = torch.load(next((run / "embeddings" / "ellipses").glob("*.pt")), weights_only=True)
    assert saved["features"].dtype == torch.float16 and saved["features"].shape == (256, 64, 64)
    assert saved["labels"].shape == (256, 256) and saved["labels"].max() == 1


KILLED_RUN = """
import sys
from pathlib import Path
from dataclasses import replace
from sam4med.clicks.training import ClickTrainConfig, train_clicks
config = ClickTrainConfig(**{**__import__("json").loads(sys.argv[3]), "first_prompt_weights": tuple(__import__("json").loads(sys.argv[4]))})
train_clicks([sys.argv[1]], sys.argv[2], config, Path(sys.argv[2]).parent / "embeddings", show_progress=False)
"""


def test_a_killed_run_continues_with_the_same_history(trained, tmp_path):
    """Killed (SIGKILL) once its first epoch is recorded, then run again: the same history as a run never stopped."""
    data, run, _ = trained
    shutil.copytree(run / "embeddings", tmp_path / "embeddings")
    config = {k: v for k, v in asdict(CONFIG).items() if k != "first_prompt_weights"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(data), str(tmp_path / "run"), json.dumps(config),
                                json.dumps(list(CONFIG.first_prompt_weights))])
    history = tmp_path / "run" / "history.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (history.is_file() and history.read_text()):
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert 1 <= len(history.read_text().splitlines()) < CONFIG.epochs  # stopped part-way
    train_clicks([data], tmp_path / "run", CONFIG, tmp_path / "embeddings", show_progress=False)

    def rows(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "history.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "run") == rows(run)


def test_exported_weights_load_over_litemedsam_and_a_changed_file_is_refused(trained, tmp_path, monkeypatch):
    _, run, _ = trained
    path = export_prompt_weights(run / "best.pt", tmp_path, "toy_click")
    card = json.loads((tmp_path / "toy_click.json").read_text())
    assert card["dtype"] == "float16" and card["base_model"] == "litemedsam"
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in saved)
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    network = model_spec("litemedsam").build()
    assert load_prompt_weights(network, "toy_click", tmp_path) == card["sha256"]
    weights = path.read_bytes()
    path.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(InputError, match="toy_click.pt: sha256 .* differs from its model card"):
        load_prompt_weights(network, "toy_click", tmp_path)
    path.unlink()
    with pytest.raises(InputError, match="differs from its model card"):
        load_prompt_weights(network, "toy_click", tmp_path)


@pytest.mark.skipif(not any(spec.prompt_weights for spec in MODELS.values()), reason="no shipped prompt weights yet")
def test_shipped_click_weights_load_with_their_hash():
    spec = next(spec for spec in MODELS.values() if spec.prompt_weights)
    card = json.loads((WEIGHTS_DIR / f"{spec.prompt_weights}.json").read_text())
    model = load_model(spec.name, device="cpu")
    assert model.weights_sha256 == card["sha256"] and model.base_weights_sha256 == card["base_weights_sha256"]
    assert (WEIGHTS_DIR / card["file"]).stat().st_size < 16 * 2**20
