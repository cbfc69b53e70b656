"""The one checkpoint layout: earlier layouts are refused, kinds are found through the registry."""

from __future__ import annotations

import errno
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sam4med.engine.checkpoints import CHECKPOINT_FORMAT, read_trained_checkpoint, register_checkpoint_kind, save_checkpoint
from sam4med.engine.errors import InputError
from sam4med.engine.models import load_model


@pytest.mark.parametrize("old", [
    {"kind": "sam4med-promptable", "config": {}, "state": {}},  # SAM-UNet / decoder runs before the shared loop
    {"config": {}, "network": {}, "in_channels": 3},  # SAMAug segmenters before the shared loop
])
def test_checkpoints_in_an_earlier_layout_are_refused(tmp_path, old):
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(InputError, match="old.pt: written by an earlier sam4med .*train it again"):
        load_model("litemedsam", path)
    with pytest.raises(InputError, match="earlier sam4med"):
        read_trained_checkpoint(path, "promptable")


@pytest.mark.parametrize(("record", "message"), [
    ({}, "without the kind of run that wrote it"),
    ({"kind": ["samunet"]}, "without the kind of run that wrote it"),
    ({"kind": "promptable", "meta": 5}, "whose 'meta' is not a record"),
    ({"kind": "samaug-segmenter", "config": None}, "whose 'config' is not a record"),
])
def test_a_damaged_record_in_the_checkpoint_layout_is_one_line_for_every_reader(tmp_path, record, message):
    """A KeyError or AttributeError traceback from segment, clicks export and samaug predict before."""
    path = tmp_path / "hand_made.pt"
    save_checkpoint(path, record)
    with pytest.raises(InputError, match=f"hand_made.pt: a sam4med checkpoint {message}"):
        load_model("litemedsam", path)
    with pytest.raises(InputError, match=message):
        read_trained_checkpoint(path, "promptable")


def test_a_promptable_kind_without_its_backbone_is_called_damaged_not_another_kind(tmp_path):
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"kind": "promptable", "config": {}, "meta": {}, "weights": {}})
    with pytest.raises(InputError, match="a 'promptable' checkpoint that does not record the backbone"):
        load_model("litemedsam", path)
    save_checkpoint(path, {"kind": "samaug-segmenter", "config": {}, "meta": {}, "weights": {}})
    with pytest.raises(InputError, match="a 'samaug-segmenter' checkpoint, not a promptable model's"):
        load_model("litemedsam", path)


def test_a_kind_no_package_registers_is_refused_and_a_registered_one_is_used(tmp_path):
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"kind": "test-kind", "config": {}, "meta": {"backbone": "litemedsam"}, "weights": {}})
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT
    with pytest.raises(InputError, match="'test-kind' checkpoint, which no installed package turns into a model"):
        load_model("litemedsam", path)
    register_checkpoint_kind("test-kind", lambda file, saved, device: SimpleNamespace(file=file, kind=saved["kind"]))
    loaded = load_model("litemedsam", path)
    assert (loaded.file, loaded.kind, loaded.precision) == (path, "test-kind", "fp32")
    with pytest.raises(InputError, match="not 'samaug-segmenter'"):
        read_trained_checkpoint(path, "samaug-segmenter")


def test_the_engine_finds_a_methods_loader_without_importing_the_method_first(tmp_path):
    """The promptable kind's loader is declared as an entry point: a fresh process that imports only the
    engine still turns a SAM-UNet checkpoint into a model."""
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"kind": "promptable", "config": {}, "meta": {"backbone": "litemedsam"}, "weights": {}})
    code = ("import sys\nfrom sam4med.engine.checkpoints import checkpoint_loader\nfrom pathlib import Path\n"
            "assert 'sam4med.samunet' not in sys.modules\n"
            "loader = checkpoint_loader('promptable', Path('x'))\n"
            "print(loader.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "sam4med.samunet.loading"


def test_a_full_disk_keeps_the_previous_checkpoint_whole(small_disk):
    """A checkpoint too big for the disk: the write fails naming the file, and the one before it still loads."""
    path = small_disk / "last.pt"
    small = {"kind": "test", "config": {}, "weights": {"w": torch.zeros(100)}}
    save_checkpoint(path, small)
    with pytest.raises(OSError) as error:
        save_checkpoint(path, {**small, "weights": {"w": torch.randn(100_000)}})
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert torch.equal(read_trained_checkpoint(path, "test")["weights"]["w"], torch.zeros(100))
    assert [p.name for p in small_disk.iterdir()] == ["last.pt"]  # no temporary left behind


@pytest.mark.parametrize(("kind", "config", "meta"), [
    ("promptable", {"zzz": 1}, {"backbone": "litemedsam"}),  # a setting this version does not know
    ("promptable", {}, {"backbone": "litemedsam"}),  # settings it needs, missing
    ("clicks", {}, {"backbone": "litemedsam"}),  # no backbone hash in its record
])
def test_a_checkpoint_whose_record_does_not_fit_this_version_is_one_line(tmp_path, kind, config, meta):
    """What a checkpoint of a newer or older sam4med, or one edited by hand, looks like to its loader."""
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"kind": kind, "config": config, "meta": meta, "weights": {}})
    with pytest.raises(InputError, match="run.pt: its configuration or weights do not fit this version of sam4med"):
        load_model("litemedsam", path)


def test_a_checkpoint_whose_bytes_changed_on_disk_is_refused_not_loaded(tmp_path):
    """PyTorch never checks the checksums its zip format keeps: flipped bytes loaded as weights without a word."""
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"kind": "test", "config": {}, "weights": {"w": torch.arange(100_000, dtype=torch.float32)}})
    assert torch.equal(read_trained_checkpoint(path, "test")["weights"]["w"], torch.arange(100_000, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor's bytes
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"best.pt: damaged checkpoint: its part .* does not match its checksum"):
        read_trained_checkpoint(path, "test")
