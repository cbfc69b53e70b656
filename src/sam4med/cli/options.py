"""What every verb shares: the one-line error policy and the option types (also used by experiments/)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from sam4med.engine.errors import InputError, one_line

F = TypeVar("F", bound=Callable[..., object])


def one_line_errors(command: F) -> F:
    """Bad input ends the command with one line naming the file or argument, exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except OSError as error:  # the file system refused: permissions, a full or read-only disk
            where = error.filename if error.filename is not None else "file system"
            typer.echo(f"error: {where}: {error.strerror or one_line(error)}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


ModelOption = Annotated[str, typer.Option(help="Registered model: litemedsam (bundled), litemedsam-click (bundled, "
                                               "takes clicks), medsam, mobilesam, sam_vit_b/l/h.")]
BackboneOption = Annotated[str, typer.Option(help="Registered SAM backbone (frozen encoder).")]
CheckpointOption = Annotated[Optional[Path], typer.Option(help="Weights file; required for every model but litemedsam.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ...; default: CUDA when present.")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads for PyTorch (default: PyTorch's choice).")]
DataOption = Annotated[list[Path], typer.Option(help="Data set folder(s) in the sam4med layout (repeatable).")]
TrainDataOption = Annotated[list[Path], typer.Option(help="Data set folder(s) (repeatable); split per data set.")]
RunFolderOption = Annotated[Path, typer.Option(help="Run folder (config.json, split.json, history.jsonl, best.pt, "
                                                    "last.pt).")]
MaxTrainImagesOption = Annotated[int, typer.Option(help="Training images per data set (0: all).")]
MaxImagesOption = Annotated[int, typer.Option(help="Images per data set (0: all).")]
EncoderOption = Annotated[str, typer.Option(help="Image encoder backend: torch, or onnx (ONNX Runtime, CPU; "
                                                 "pip install onnxruntime).")]
EpochsOption = Annotated[int, typer.Option(help="Training epochs.")]
SeedOption = Annotated[int, typer.Option(help="Seed of the training randomness.")]


def echo_training_result(out: Path, result: object, model_hint: str = "") -> None:
    """One line on a finished (or resumed) training run: best validation Dice, epoch, minutes."""
    typer.echo(f"{out}: best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}, "  # type: ignore[attr-defined]
               f"{result.seconds / 60:.1f} min of training{model_hint}")  # type: ignore[attr-defined]
