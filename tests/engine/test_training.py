"""The one training loop: checkpoints in the shared layout, history, and a resume that trains exactly
as an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam4med.engine.checkpoints import read_trained_checkpoint
from sam4med.engine.errors import InputError
from sam4med.engine.runs import HISTORY_FILE
from sam4med.engine.splits import training_split
from sam4med.engine.training import TrainingTask, fit


class LineTask(TrainingTask):
    """Fit y = 3x - 1 with noise drawn from the epoch's generator: every source of randomness the loop owns."""

    kind = "test-line"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=0.05)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, 0.9)

    def batches(self, epoch: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.tensor(rng.uniform(-1, 1, (4, 16, 1)), dtype=torch.float32)
        return list(zip(x, 3 * x - 1 + 0.1 * torch.randn_like(x)))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], update: int = 0) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.module(x), y)

    def validate(self) -> float:
        with torch.no_grad():
            x = torch.linspace(-1, 1, 50)[:, None]
            return float(1 / (1 + torch.nn.functional.mse_loss(self.module(x), 3 * x - 1)))


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(tmp_path):
    straight = fit(LineTask(), tmp_path / "straight", {"lr": 0.05}, 6, seed=3, description="line",
                   show_progress=False)
    assert straight.epochs_run == 6 and straight.best_val_dice > 0.5
    fit(LineTask(), tmp_path / "resumed", {"lr": 0.05}, 2, seed=3, description="line", show_progress=False)
    resumed = fit(LineTask(), tmp_path / "resumed", {"lr": 0.05}, 6, seed=3, description="line", show_progress=False)
    drop = ("seconds",)
    assert [{k: v for k, v in row.items() if k not in drop} for row in history(tmp_path / "resumed")] == \
        [{k: v for k, v in row.items() if k not in drop} for row in history(tmp_path / "straight")]
    assert (resumed.best_epoch, resumed.best_val_dice) == (straight.best_epoch, straight.best_val_dice)
    for name in ("best.pt", "last.pt"):
        a = read_trained_checkpoint(tmp_path / "straight" / name, "test-line")
        b = read_trained_checkpoint(tmp_path / "resumed" / name, "test-line")
        assert a["epoch"] == b["epoch"] and a["config"] == {"lr": 0.05}
        for key, value in a["weights"].items():
            torch.testing.assert_close(b["weights"][key], value, rtol=0, atol=0)


def test_history_rows_a_cut_file_lost_are_written_back_from_the_checkpoint(tmp_path):
    """history.jsonl is the run's record and its curves: rows lost to a cut or edited file come back on resume."""
    fit(LineTask(), tmp_path / "run", {"lr": 0.05}, 4, seed=3, description="line", show_progress=False)
    whole = history(tmp_path / "run")
    lines = (tmp_path / "run" / HISTORY_FILE).read_text().splitlines(keepends=True)
    (tmp_path / "run" / HISTORY_FILE).write_text(lines[0] + lines[3])  # epochs 2 and 3 gone
    fit(LineTask(), tmp_path / "run", {"lr": 0.05}, 6, seed=3, description="line", show_progress=False)
    assert history(tmp_path / "run")[:4] == whole and [row["epoch"] for row in history(tmp_path / "run")] == \
        [1, 2, 3, 4, 5, 6]


class KilledTask(LineTask):
    """Killed (as by Ctrl-C or the machine going away) on its ``kill_at``-th training step."""

    def __init__(self, kill_at: int) -> None:
        super().__init__()
        self.kill_at, self.steps = kill_at, 0

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], update: int = 0) -> torch.Tensor:
        self.steps += 1
        if self.steps == self.kill_at:
            raise KeyboardInterrupt
        return super().loss(batch, update)


def test_a_run_killed_mid_epoch_resumes_from_its_last_step_and_trains_exactly_as_an_uninterrupted_one(tmp_path):
    straight = fit(LineTask(), tmp_path / "straight", {"lr": 0.05}, 4, seed=3, description="line",
                   show_progress=False)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # epoch 3 of 4 batches: steps 9 and 10 done, killed in step 11
        fit(KilledTask(kill_at=11), out, {"lr": 0.05}, 4, seed=3, description="line", show_progress=False,
            checkpoint_minutes=0)
    saved = read_trained_checkpoint(out / "last.pt", "test-line")
    assert saved["epoch"] == 2 and saved["resume"]["loop"]["partial"]["steps"] == 2
    assert len(history(out)) == 2
    resumed_task = KilledTask(kill_at=0)
    resumed = fit(resumed_task, out, {"lr": 0.05}, 4, seed=3, description="line", show_progress=False,
                  checkpoint_minutes=0)
    assert resumed_task.steps == 6  # the two steps left of epoch 3 and the four of epoch 4
    drop = ("seconds",)
    assert [{k: v for k, v in row.items() if k not in drop} for row in history(out)] == \
        [{k: v for k, v in row.items() if k not in drop} for row in history(tmp_path / "straight")]
    assert (resumed.best_epoch, resumed.best_val_dice, resumed.epochs_run) == \
        (straight.best_epoch, straight.best_val_dice, 4)
    a = read_trained_checkpoint(tmp_path / "straight" / "last.pt", "test-line")
    b = read_trained_checkpoint(out / "last.pt", "test-line")
    assert "partial" not in b["resume"]["loop"]
    for key, value in a["weights"].items():
        torch.testing.assert_close(b["weights"][key], value, rtol=0, atol=0)


def test_a_run_logged_to_a_file_gets_a_line_per_epoch(tmp_path, capsys):
    """Under nohup or a batch scheduler there is no terminal for the progress bar: each epoch says how it went."""
    fit(LineTask(), tmp_path / "logged", {"lr": 0.05}, 3, seed=3, description="train line")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train line: epoch")]
    rows = history(tmp_path / "logged")
    assert [line.split(",")[0] for line in lines] == [f"train line: epoch {e}/3" for e in (1, 2, 3)]
    for line, row in zip(lines, rows):
        assert f"validation Dice {row['val_dice']:.4f}" in line and f"loss {row['loss']:.4f}" in line
        assert line.endswith(" min")  # one line, not wrapped at the 80 columns a file is given


def test_a_run_whose_best_checkpoint_is_gone_says_so_instead_of_reporting_it(tmp_path):
    fit(LineTask(), tmp_path, {"lr": 0.05}, 2, seed=0, description="line", show_progress=False)
    (tmp_path / "best.pt").unlink()
    for epochs in (2, 3):  # finished, or continued
        with pytest.raises(InputError, match=r"best.pt: missing, though last.pt records epoch \d as the best"):
            fit(LineTask(), tmp_path, {"lr": 0.05}, epochs, seed=0, description="line", show_progress=False)
    assert len(history(tmp_path)) == 2


def test_another_configuration_in_the_run_folder_is_refused(tmp_path):
    fit(LineTask(), tmp_path, {"lr": 0.05}, 1, seed=0, description="line", show_progress=False)
    with pytest.raises(InputError, match=r"other settings \(lr differs\)"):
        fit(LineTask(), tmp_path, {"lr": 0.1}, 2, seed=0, description="line", show_progress=False)
    with pytest.raises(InputError, match=r"other settings \(patience differs\)"):
        fit(LineTask(), tmp_path, {"lr": 0.05, "patience": 3}, 2, seed=0, description="line", show_progress=False)


def test_a_run_from_before_a_setting_existed_resumes_while_that_setting_is_unset(tmp_path):
    """An older run's config.json lacks ``patience``; the same run with patience unset (None) goes on."""
    fit(LineTask(), tmp_path, {"lr": 0.05}, 1, seed=0, description="line", show_progress=False)
    resumed = fit(LineTask(), tmp_path, {"lr": 0.05, "patience": None}, 2, seed=0, description="line",
                  show_progress=False)
    assert resumed.epochs_run == 2 and len(history(tmp_path)) == 2


class DivergingTask(LineTask):
    """From the second epoch on its targets overflow, as a far too high learning rate makes the weights do."""

    def batches(self, epoch: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x, y * (1e39 if epoch else 1)) for x, y in super().batches(epoch, rng)]


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_epoch(tmp_path):
    task = DivergingTask()
    with pytest.raises(InputError, match=r"training loss became (nan|inf) at epoch 2, step \d+; lower "
                                         r"--learning-rate \(the run keeps epoch 1\)"):
        fit(task, tmp_path, {"lr": 0.05}, 3, seed=0, description="line", show_progress=False)
    assert all(torch.isfinite(w).all() for w in read_trained_checkpoint(tmp_path / "last.pt", "test-line")["weights"].values())
    assert read_trained_checkpoint(tmp_path / "last.pt", "test-line")["epoch"] == 1
    assert len(history(tmp_path)) == 1


class NothingToValidateTask(LineTask):
    """Validation over no object (every validation mask empty): the mean of nothing."""

    def validate(self) -> float:
        return float("nan")


def test_validation_over_no_object_stops_with_one_line_and_writes_no_checkpoint(tmp_path):
    with pytest.raises(InputError, match=r"split.json: the validation images hold no object to score"):
        fit(NothingToValidateTask(), tmp_path, {"lr": 0.05}, 2, seed=0, description="line", show_progress=False)
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    assert not (tmp_path / "history.jsonl").is_file() or history(tmp_path) == []


def test_checkpoints_name_their_kind(tmp_path):
    fit(LineTask(), tmp_path, {}, 1, seed=0, description="line", show_progress=False)
    with pytest.raises(InputError, match="a 'test-line' checkpoint, not 'promptable'"):
        read_trained_checkpoint(tmp_path / "last.pt", "promptable")


class ScriptedValidationTask(LineTask):
    """Validation Dice read from a script by epoch, so the epoch of the plateau is known."""

    scores = (0.1, 0.5, 0.4, 0.45, 0.3, 0.9, 0.95)

    def batches(self, epoch: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch = epoch
        return super().batches(epoch, rng)

    def validate(self) -> float:
        return self.scores[self.epoch]


def test_early_stopping_ends_a_run_after_patience_epochs_without_improvement_and_it_stays_stopped(tmp_path):
    straight = fit(ScriptedValidationTask(), tmp_path / "straight", {}, 7, seed=0, description="line",
                   show_progress=False, patience=3)
    # best 0.5 at epoch 2; epochs 3, 4, 5 do not beat it: the run ends after epoch 5, before the 0.9 of epoch 6
    assert (straight.best_epoch, straight.best_val_dice, straight.epochs_run, straight.stopped_early) == (2, 0.5, 5, True)
    assert [row["val_dice"] for row in history(tmp_path / "straight")] == [0.1, 0.5, 0.4, 0.45, 0.3]
    again = fit(ScriptedValidationTask(), tmp_path / "straight", {}, 7, seed=0, description="line",
                show_progress=False, patience=3)
    assert (again.epochs_run, again.stopped_early) == (5, True) and len(history(tmp_path / "straight")) == 5

    fit(ScriptedValidationTask(), tmp_path / "killed", {}, 4, seed=0, description="line", show_progress=False,
        patience=3)  # stands for a run killed after epoch 4
    resumed = fit(ScriptedValidationTask(), tmp_path / "killed", {}, 7, seed=0, description="line",
                  show_progress=False, patience=3)
    assert (resumed.epochs_run, resumed.best_epoch, resumed.stopped_early) == (5, 2, True)
    without = fit(ScriptedValidationTask(), tmp_path / "without", {}, 7, seed=0, description="line", show_progress=False)
    assert (without.epochs_run, without.best_epoch, without.stopped_early) == (7, 7, False)
    # a patience of 1 trains the first epoch (it once stopped a fresh run before any, as if epoch 0 had been best)
    one = fit(ScriptedValidationTask(), tmp_path / "one", {}, 7, seed=0, description="line", show_progress=False,
              patience=1)
    assert (one.epochs_run, one.best_epoch, one.stopped_early) == (3, 2, True)


class AutocastRecordingTask(LineTask):
    """LineTask that notes the dtype its forward pass computes in, in training and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {"train": set(), "validate": set()}

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], update: int = 0) -> torch.Tensor:
        x, y = batch
        prediction = self.module(x)
        self.seen["train"].add(prediction.dtype)
        return torch.nn.functional.mse_loss(prediction, y)

    def validate(self) -> float:
        self.seen["validate"].add(self.module(torch.zeros(1, 1)).dtype)
        return super().validate()


def test_bf16_precision_runs_the_training_steps_under_autocast_and_still_learns(tmp_path):
    """The forward pass of each step computes in bf16, the weights stay fp32, validation runs in fp32, and the
    line is still learnt about as well as in fp32."""
    results = {}
    for precision in (None, "bf16"):
        task = AutocastRecordingTask()
        results[precision] = fit(task, tmp_path / str(precision), {"lr": 0.05, "precision": precision}, 6, seed=3,
                                 description="line", show_progress=False)
        assert task.seen["train"] == {torch.bfloat16 if precision else torch.float32}
        assert task.seen["validate"] == {torch.float32}
        assert all(p.dtype == torch.float32 for p in task.module.parameters())
    assert results["bf16"].best_val_dice > 0.9 * results[None].best_val_dice > 0.4
    with pytest.raises(InputError, match="--precision 'fp16'"):
        fit(LineTask(), tmp_path / "fp16", {"precision": "fp16"}, 1, seed=0, description="line", show_progress=False)


def test_fp32_spelt_out_resumes_a_run_whose_precision_is_unset_and_the_other_way(tmp_path):
    """A run made before the precision setting existed (or with it unset) and one asked for "fp32" are the same
    run: either spelling resumes the other's folder, and any other precision is refused there."""
    for first, second in ((None, "fp32"), ("fp32", None)):
        out = tmp_path / str(first)
        fit(LineTask(), out, {"lr": 0.05, "precision": first}, 1, seed=0, description="line", show_progress=False)
        fit(LineTask(), out, {"lr": 0.05, "precision": second}, 2, seed=0, description="line", show_progress=False)
        history = [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]
        assert [row["epoch"] for row in history] == [1, 2]
        with pytest.raises(InputError, match="precision differ"):
            fit(LineTask(), out, {"lr": 0.05, "precision": "bf16"}, 3, seed=0, description="line", show_progress=False)


def test_a_run_resumed_on_other_images_under_the_same_data_set_name_is_refused(tmp_path):
    """Another folder named alike (or the same folder with images added) must not continue the first one's
    weights and overwrite the record of what they were trained on."""
    from conftest import write_dataset

    from sam4med.engine.datasets import load_dataset
    from sam4med.engine.runs import SPLIT_FILE
    from sam4med.engine.splits import DEFAULT_FRACTIONS
    from sam4med.engine.training import start_run

    def splits(count: int, folder: str) -> dict:
        dataset = load_dataset(write_dataset(tmp_path / folder, broken=False, count=count))
        return {dataset.name: training_split(dataset, dict(DEFAULT_FRACTIONS), 0)}

    out = tmp_path / "run"
    start_run(out, {"lr": 0.05}, splits(6, "first"))
    recorded = (out / SPLIT_FILE).read_bytes()
    start_run(out, {"lr": 0.05}, splits(6, "copy"))  # the same images elsewhere: the same split, resumed
    with pytest.raises(InputError, match=r"run: its run was trained on other images of ellipses \(its split.json\)"):
        start_run(out, {"lr": 0.05}, splits(8, "more"))
    assert (out / SPLIT_FILE).read_bytes() == recorded
    (out / SPLIT_FILE).write_text("[1, 2")
    with pytest.raises(InputError, match=r"split.json: damaged \(not a JSON object\)"):
        start_run(out, {"lr": 0.05}, splits(6, "again"))


def test_a_second_training_into_a_run_folder_another_process_is_writing_is_refused(tmp_path, held_elsewhere):
    fit(LineTask(), tmp_path, {"lr": 0.05}, 1, seed=0, description="line", show_progress=False)
    kept = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with held_elsewhere(tmp_path) as pid:
        with pytest.raises(InputError, match=f"another run \\(process {pid}\\) is writing into this folder"):
            fit(LineTask(), tmp_path, {"lr": 0.05}, 2, seed=0, description="line", show_progress=False)
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != ".sam4med.lock"} == kept
    assert fit(LineTask(), tmp_path, {"lr": 0.05}, 2, seed=0, description="line", show_progress=False).epochs_run == 2
