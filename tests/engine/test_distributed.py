"""A trainer under torchrun on 2 CPU processes learns as the one-process run does for the same global batch and
seed, writes from rank 0 only, and resumes on another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sam4med.engine.distributed import Processes, shard

from conftest import write_dataset

# The gradients of the two halves, averaged, are those of the whole batch up to float rounding (measured:
# epoch losses equal to about 1e-8), so losses are held to a relative 1e-5. Adam divides each gradient by
# its running size, so where a gradient is near zero the rounding can move a weight by up to about one
# learning rate (1e-3) over a run: weights are held to that.
TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-3


def _command(data, out, processes: int) -> list[str]:
    arguments = ["samaug", "train", "--data", str(data), "--out", str(out), "--net", "unet", "--input", "raw",
                 "--image-size", "64", "--features", "4", "--epochs", str(EPOCHS), "--batch-size", "4",
                 "--patches-per-image", "4", "--threads", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"] \
        if processes > 1 else [sys.executable, "-m"]
    return launcher + ["sam4med", *arguments]


ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
EPOCHS = 4


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_two_processes_learn_as_one_and_resume_on_one(tmp_path):
    data = write_dataset(tmp_path / "ellipses", broken=False, count=12)
    single = subprocess.run(_command(data, tmp_path / "one", 1), capture_output=True, text=True, env=ENVIRONMENT)
    assert single.returncode == 0, single.stderr[-2000:]
    # two processes, killed (launcher and workers) once the first epoch is written, then resumed on one
    double = subprocess.Popen(_command(data, tmp_path / "two", 2), env=ENVIRONMENT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "two" / "history.jsonl"
    deadline = time.time() + 300
    while double.poll() is None and time.time() < deadline and not (history.is_file() and history.read_text()):
        time.sleep(0.05)
    os.killpg(double.pid, signal.SIGKILL)
    double.wait()
    written = len(history.read_text().splitlines())
    assert 1 <= written < EPOCHS  # stopped part-way
    resumed = subprocess.run(_command(data, tmp_path / "two", 1), capture_output=True, text=True, env=ENVIRONMENT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [row["epoch"] for row in two] == list(range(1, EPOCHS + 1))  # rank 0 alone wrote: one row per epoch
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=TOLERANCE)
    weights = [torch.load(tmp_path / run / "last.pt", weights_only=True)["weights"] for run in ("one", "two")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=WEIGHT_TOLERANCE)


def test_a_batch_is_shared_out_item_by_item():
    batch = {"image": torch.arange(5), "names": [0, 1, 2, 3, 4]}
    first, second = (shard(batch, Processes(rank, 2)) for rank in (0, 1))
    assert first["image"].tolist() == [0, 2, 4] and second["names"] == [1, 3]
    assert shard(batch, Processes()) is batch
    assert shard((torch.ones(4, 2), torch.zeros(4)), Processes(1, 2))[0].shape == (2, 2)
