"""``sam4med clicks``: train a SAM model's prompt encoder and mask decoder for clicks, and export the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sam4med.cli.options import BackboneOption, DeviceOption, EncoderOption, EpochsOption, MaxTrainImagesOption, RunFolderOption
from sam4med.cli.options import PatienceOption, RayWorkersOption, SeedOption, ThreadsOption, TrainDataOption, TrainPrecisionOption
from sam4med.cli.options import echo_training_result, one_line_errors, recorded_path
from sam4med.engine.runtime import configure_cpu

app = typer.Typer(no_args_is_help=True, help="A click-capable medical SAM: train the prompt encoder and decoder.")


@app.command()
@one_line_errors
def train(
    data: TrainDataOption,
    out: RunFolderOption,
    embeddings: Annotated[Optional[Path], typer.Option(help="Embedding cache folder (default OUT/embeddings); "
                                                             "share it between runs.")] = None,
    backbone: BackboneOption = "litemedsam",
    rounds: Annotated[int, typer.Option(help="Corrective clicks after each first prompt.")] = 3,
    steps_per_epoch: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 200,
    images_per_step: Annotated[int, typer.Option(help="Images per step.")] = 2,
    objects_per_image: Annotated[int, typer.Option(help="Objects drawn from each image per step.")] = 4,
    epochs: EpochsOption = 10,
    patience: PatienceOption = 0,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (times 0.8 each epoch).")] = 1e-4,
    max_train_images: MaxTrainImagesOption = 200,
    flips: Annotated[bool, typer.Option(help="Also train on mirror images (encoded once more).")] = True,
    tile: Annotated[int, typer.Option(help="Tile core in px for the --tiled data sets (0: none); prompt them "
                                           "with the same --tile at inference.")] = 0,
    halo: Annotated[int, typer.Option(help="Pixels added around each tile's core.")] = 32,
    tiled: Annotated[list[str], typer.Option(help="Name of a --data set whose images larger than a tile are also "
                                                  "trained on tile by tile: small objects (repeatable).")] = [],  # noqa: B006
    balance_datasets: Annotated[bool, typer.Option(help="Draw each step's images from the data sets evenly "
                                                        "(their tiles counted apart), not from all images.")] = False,
    tile_share: Annotated[Optional[float], typer.Option(help="Chance that each drawn image is a tile of a --tiled "
                                                        "set (else a whole image), so that tiles cannot crowd out "
                                                        "large objects; default: tiles are images like any other.")] = None,
    background_clicks: Annotated[int, typer.Option(help="Lone clicks on background per image and step; they "
                                                   "teach the IoU head what is not an object.")] = 2,
    base_box_decoder: Annotated[bool, typer.Option(help="Decode a box alone with the frozen base decoder, as "
                                                   "litemedsam-click does, and train only the corrections after it.")] = True,
    train_only: Annotated[str, typer.Option(help="What trains: all (prompt encoder and mask decoder) or iou_head "
                                                 "(only the IoU head, on lone clicks; masks unchanged; needs --init).")] = "all",
    iou_rank_weight: Annotated[Optional[float], typer.Option(help="Weight of a ranking term (ListNet) on a lone "
                                                             "click's 3 masks beside the IoU head's MSE: the head "
                                                             "is used for its argmax; default: MSE alone.")] = None,
    centre_click_share: Annotated[Optional[float], typer.Option(help="Chance that a lone first click is the "
                                                                "object's centre, not a random pixel of it; "
                                                                "default: always a random pixel.")] = None,
    click_weight: Annotated[Optional[float], typer.Option(help="Weight of a term holding each corrected mask to "
                                                          "every click given (the logit under a click against its "
                                                          "label); default: the mask loss alone.")] = None,
    first_round_share: Annotated[Optional[float], typer.Option(help="Share of each rollout's loss carried by the "
                                                               "first prompt's mask, the rest split over the "
                                                               "corrective rounds; default: every round the same.")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from these prompt weights (an exported .pt or a "
                                                 "run's checkpoint), e.g. src/sam4med/weights/litemedsam_click.pt.")] = None,
    seed: SeedOption = 0,
    precision: TrainPrecisionOption = "fp32",
    encoder: EncoderOption = "torch",
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    ray: Annotated[Optional[str], typer.Option(help="Embed the images on a Ray cluster (auto or its address; one "
                                                    "thread per worker) before training here.")] = None,
    ray_workers: RayWorkersOption = None,
) -> None:
    """Train for clicks on cached embeddings (iterative click simulation); resumable."""
    from sam4med.clicks.training import ClickTrainConfig, train_clicks
    from sam4med.engine.executors import make_executor

    executor = make_executor(ray, ray_workers)
    configure_cpu(threads)
    config = ClickTrainConfig(backbone=backbone, rounds=rounds, steps_per_epoch=steps_per_epoch,
                              images_per_step=images_per_step, objects_per_image=objects_per_image, epochs=epochs,
                              patience=patience or None,
                              learning_rate=learning_rate, max_train_images=max_train_images or None, flips=flips,
                              tile=tile or None, halo=halo, tiled=tuple(tiled), balance_datasets=balance_datasets,
                              tile_share=tile_share,
                              background_clicks=background_clicks, base_box_decoder=base_box_decoder,
                              iou_rank_weight=iou_rank_weight, centre_click_share=centre_click_share,
                              click_weight=click_weight, first_round_share=first_round_share,
                              init_weights=recorded_path(init),
                              trainable=None if train_only == "all" else train_only, seed=seed,
                              precision=precision)
    echo_training_result(out, train_clicks(data, out, config, embeddings, encoder, device=device, executor=executor),
                         f"; use with --model {backbone} --checkpoint {out / 'best.pt'}")


@app.command()
@one_line_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="best.pt of a `sam4med clicks train` run.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.pt (fp16) and its model card NAME.json.")],
    name: Annotated[str, typer.Option(help="File name stem of the weights.")] = "litemedsam_click",
    overwrite: Annotated[bool, typer.Option(help="Replace other weights already exported under --name.")] = False,
) -> None:
    """Export a run's prompt encoder and mask decoder as fp16 weights with a model card."""
    from sam4med.clicks.loading import export_prompt_weights

    path = export_prompt_weights(checkpoint, out, name, overwrite=overwrite)
    typer.echo(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
