"""What every verb shares: the one-line error policy and the option types (also used by experiments/)."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from typer.core import TyperGroup

from sam4med.engine.errors import InputError, refused_by_file_system

F = TypeVar("F", bound=Callable[..., object])


INTERRUPTED = 130  # the exit status typer gives a command stopped by Ctrl+C (128 + SIGINT)


class OneLineErrorsGroup(TyperGroup):
    """The root command: a usage error (a wrong type, an unknown or missing option) is one line
    ``error: <option>: <problem>`` with exit status 2, like every other bad input, not a framed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # typer's own copy of click's usage errors
            if type(error).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as typer shows it
                error.show()  # type: ignore[attr-defined]
                sys.exit(error.exit_code)  # type: ignore[attr-defined]
            typer.echo(f"error: {usage_error_line(error)}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if result == INTERRUPTED:  # typer's answer to Ctrl+C, silent on its own
            typer.echo("error: interrupted; what was finished is kept, and the same command continues a batch "
                       "run or training where it stopped", err=True)
        sys.exit(result if isinstance(result, int) else 0)


def usage_error_line(error: Exception) -> str:
    """``<option>: <problem>`` for a usage error (the option named when there is one)."""
    message = " ".join(getattr(error, "message", str(error)).split())
    param = getattr(error, "param", None)
    opts = getattr(param, "opts", None)
    if opts and type(error).__name__ == "MissingParameter":
        return f"{opts[0]}: missing (required)"
    name = opts[0] if opts else getattr(error, "option_name", None)  # an option used wrongly, or unknown
    if name:
        message = message.replace(f"Option '{name}' ", "").replace(f"No such option: {name}", "no such option")
        if re.fullmatch(r"requires \d+ arguments\.?", message):  # `--box 1,2,3,4`, as `--point 1,2` is written
            message = f"{message.rstrip('.')}, separated by spaces (not commas)"
        return f"{name}: {message}"
    return f"arguments: {message}" if message.startswith("Got unexpected extra argument") else message


def recorded_path(path: Path | None) -> str | None:
    """A file option as a run records it: absolute when the file is there, so the run resumes from another
    working directory (``engine.runs.claim_folder`` matches two paths of one file); as typed otherwise, so the
    error names what was typed."""
    if path is None:
        return None
    return str(path.resolve()) if path.is_file() else str(path)


def exit_if_every_image_failed(summaries: Iterable[Any]) -> None:
    """A batch run that finished no image at all (each one an error row, saying why, now or in an earlier run) ends
    with exit status 1, so a script notices; one with any image done, now or before, ends as usual."""
    summaries = list(summaries)
    failed = sum(s.failed + s.failed_before for s in summaries)
    if failed and not sum(s.computed + s.skipped - s.failed_before for s in summaries):
        raise typer.Exit(1)


def one_line_errors(command: F) -> F:
    """Bad input ends the command with one line naming the file or argument, exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            typer.echo(_printable(f"error: {error}"), err=True)
            raise typer.Exit(2) from None
        except OSError as error:  # the file system refused: permissions, a full or read-only disk
            typer.echo(_printable(f"error: {refused_by_file_system(error)}"), err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _printable(line: str) -> str:
    """``line`` with control characters escaped (``\\n``), so that a file name holding a newline stays on the
    one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


ModelOption = Annotated[str, typer.Option(help="Registered model: litemedsam-click (bundled, the default: "
                                               "LiteMedSAM's box masks, and clicks), litemedsam (bundled), medsam, "
                                               "mobilesam, sam_vit_b/l/h.")]
BackboneOption = Annotated[str, typer.Option(help="Registered SAM backbone (frozen encoder).")]
CheckpointOption = Annotated[Optional[Path], typer.Option(help="Weights file; required for every model but litemedsam.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ...; default: CUDA when present.")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads for PyTorch (default: PyTorch's choice; "
                                                            "with --ray: per worker, default 1).")]
RayOption = Annotated[Optional[str], typer.Option(help="Run the images on a Ray cluster: auto (the cluster this "
                                                       "machine belongs to, or a local one) or its address; "
                                                       "pip install 'sam4med[distributed]'.")]
RayWorkersOption = Annotated[Optional[int], typer.Option(help="Ray actors (each loads the model once; default: the "
                                                              "cluster's CPUs / --threads).")]
DataOption = Annotated[list[Path], typer.Option(help="Data set folder(s) in the sam4med layout (repeatable).")]
TrainDataOption = Annotated[list[Path], typer.Option(help="Data set folder(s) (repeatable); split per data set.")]
RunFolderOption = Annotated[Path, typer.Option(help="Run folder (config.json, split.json, history.jsonl, best.pt, "
                                                    "last.pt).")]
MaxTrainImagesOption = Annotated[int, typer.Option(help="Training images per data set (0: all).")]
MaxImagesOption = Annotated[int, typer.Option(help="Images per data set (0: all).")]
EncoderOption = Annotated[str, typer.Option(help="Image encoder backend: torch, onnx (ONNX Runtime, CPU; same "
                                                 "embedding), openvino (OpenVINO, CPU; same embedding, in bf16 with "
                                                 "--precision bf16) or onnx-int8 (int8 MatMul weights: faster, "
                                                 "changes the embedding slightly; recorded in the protocol).")]
PrecisionOption = Annotated[str, typer.Option(help="fp32, or bf16: PyTorch's encoder and decoders under bfloat16 "
                                                   "autocast (much faster on CPUs with AVX-512 BF16 or AMX; masks "
                                                   "differ at the edges, and in everything mode a mask near the "
                                                   "thresholds may come or go; recorded in the protocol).")]
TrainPrecisionOption = Annotated[str, typer.Option(help="fp32, or bf16: each training step's forward pass under "
                                                        "bfloat16 autocast (weights, gradients, optimiser and "
                                                        "validation stay fp32); pays on CPUs with AVX-512 BF16 or "
                                                        "AMX.")]
EverythingMethodOption = Annotated[str, typer.Option(help="Everything mode's proposals: auto (the model's own "
                                                          "choice), points (SAM's grid) or boxes.")]
PointsPerSideOption = Annotated[int, typer.Option(help="Everything mode's point grid: points per side of the image "
                                                        "(or tile).")]
PredIouThreshOption = Annotated[Optional[float], typer.Option(help="Everything mode keeps masks of predicted IoU at "
                                                                   "least this; default: the model's.")]
StabilityThreshOption = Annotated[Optional[float], typer.Option(help="Everything mode keeps masks of stability score "
                                                                     "at least this; default: the model's.")]
EpochsOption = Annotated[int, typer.Option(help="Training epochs (at most, with --patience).")]
PatienceOption = Annotated[int, typer.Option(help="Stop early after this many epochs without a better validation "
                                                  "Dice (0: train every epoch).")]
SeedOption = Annotated[int, typer.Option(help="Seed of the training randomness.")]
TileOption = Annotated[int, typer.Option(help="Tiled embeddings for large images: each tile's core in px, encoded with "
                                              "its halo at the model's size; a prompt goes to the tile that holds it "
                                              "(0: whole images).")]
HaloOption = Annotated[int, typer.Option(help="Pixels around each tile's core (with --tile).")]
# the verbs that segment a user's images, without ground truth (so without the benchmark's oracle rule)
SegmentMaskRuleOption = Annotated[Optional[str], typer.Option(help="single, auto (3 masks for a lone click) or iou; "
                                                                   "default: the model's.")]
CorrectionOption = Annotated[str, typer.Option(help="What a corrective click may change: local (the changed region "
                                                    "at the click, the mask kept elsewhere), global (the decoder's "
                                                    "new mask everywhere, SAM's loop) or auto (local when the "
                                                    "prompt holds a box, else global). Small objects whose box "
                                                    "mask is poor (nuclei, cells) reach a good mask sooner with "
                                                    "global.")]


def echo_training_result(out: Path, result: object, model_hint: str = "") -> None:
    """One line on a finished (or resumed) training run: best validation Dice, epoch, minutes (from rank 0 alone
    under torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    stopped = f", stopped early after epoch {result.epochs_run}" if result.stopped_early else ""  # type: ignore[attr-defined]
    typer.echo(f"{out}: best validation Dice {result.best_val_dice:.4f} at epoch {result.best_epoch}{stopped}, "  # type: ignore[attr-defined]
               f"{result.seconds / 60:.1f} min of training{model_hint}")  # type: ignore[attr-defined]
