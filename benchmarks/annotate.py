"""The annotation page's speed and the effort it saves, measured on this machine.

    python benchmarks/annotate.py --data ../shared/data/kvasir_seg [--data ...] [--max-images 10] [--correction auto]
                                  [--model litemedsam-click] [--out runs/annotate-bench] [--skip-speed]

Speed (through the HTTP API, as the page calls it, on the first data set's first images copied to a
temporary folder): open-to-ready of the process's first image (warm-up included), of an image never
seen (its embedding computed), of the next image
after the background prefetch, and of an image seen before (cached embedding); click-to-mask of a box
and of corrective clicks (request to decoded PNG mask, median).

Effort (COSMOS's argument that SAM speeds annotation up, as numbers): for each object (connected
component of at least --min-area px; at most --max-objects per image, drawn with a fixed seed) of the
first --max-images images of each data set, a simulated
annotator reaches Dice 0.90 with
- sam4med, box first: a box (2 clicks: its corners), then corrective clicks at the centre of the
  largest error region (the benchmark's interactive rule), at most --rounds of them, each changing the
  mask as --correction says (auto, the annotator's default: near the click once the object has a box);
- sam4med, clicks only: a click at the object's innermost point, then corrective clicks alike;
- a polygon: the fewest vertices of the object's outline, simplified (Douglas-Peucker) as far as Dice
  stays >= 0.90, each vertex one click.
- with --everything, Everything first (the page's A): the objects the page's own code finds on the whole image
  (annotate.session.find_objects); an object whose best-matching found object has Dice >= 0.90 costs no click,
  one with Dice >= 0.5 costs the corrective clicks that bring it to 0.90, decoded as the page does (its found
  box's mask, then clicks; at most --rounds), and one never found (Dice < 0.5) costs what a box and clicks cost.
  Per image, the found objects that match no true object (Dice < 0.5) are counted: each is one click to drop, and
  the key press itself is one.
An object sam4med never brings to 0.90 counts its cap (2 + rounds, or 1 + rounds; rounds for a found one) and is
reported.
The table (per data set: means and the ratio polygon vertices / sam4med clicks) goes to OUT/effort.csv.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.draw import polygon as fill_polygon
from skimage.measure import approximate_polygon, find_contours

from sam4med.annotate.session import find_objects
from sam4med.engine.datasets import load_dataset
from sam4med.engine.imageio import load_pair
from sam4med.engine.interactive import CORRECTIONS, run_interactive
from sam4med.engine.metrics import dice
from sam4med.engine.models import load_model
from sam4med.engine.objects import object_labels
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, center_point, tight_box
from sam4med.engine.runtime import configure_cpu

TARGET = 0.90


def polygon_vertices(mask: np.ndarray, target: float = TARGET) -> int:
    """The fewest vertices of a simplified outline of ``mask`` whose filled polygon keeps Dice >= target."""
    padded = np.pad(mask, 1)
    outline = max(find_contours(padded.astype(float), 0.5), key=len)

    def score(tolerance: float) -> tuple[float, int]:
        simple = approximate_polygon(outline, tolerance)
        filled = np.zeros_like(padded)
        rr, cc = fill_polygon(simple[:, 0], simple[:, 1], padded.shape)
        filled[rr, cc] = True
        return dice(filled, padded), len(simple) - 1  # closed: the last point repeats the first

    low, high = 0.0, float(max(mask.shape))
    best = score(low)[1]
    for _ in range(25):  # the largest tolerance that keeps the target, by bisection
        middle = (low + high) / 2
        value, vertices = score(middle)
        if value >= target:
            low, best = middle, min(best, vertices)
        else:
            high = middle
    return max(best, 3)


def everything_first(predictor: Predictor, gt: np.ndarray, found: list[tuple[np.ndarray, list[float]]],
                     by_box: tuple[int, bool], rounds: int, rng: np.random.Generator, mask_rule: str,
                     correction: str) -> tuple[int, bool, float]:
    """Clicks to bring ``gt`` to the target from the page's found objects (mask, tight box), whether it got
    there, and the Dice of its best-matching found object; ``by_box``: the clicks and outcome of a drawn box."""
    scores = [dice(mask, gt) for mask, _ in found]
    best = int(np.argmax(scores)) if scores else -1
    if best < 0 or scores[best] < 0.5:  # never found: drawn as without Everything
        return by_box[0], by_box[1], max(scores, default=0.0)
    if scores[best] >= TARGET:
        return 0, True, scores[best]
    corrected = run_interactive(predictor, gt, Prompt(box=found[best][1]), rounds, rng, "largest", mask_rule,
                                correction)  # type: ignore[arg-type]
    reached = [k for k, value in enumerate(corrected.dice_per_round) if k >= 1 and value >= TARGET]
    return (reached[0], True, scores[best]) if reached else (rounds, False, scores[best])


def effort(data: list[Path], model_name: str, max_images: int, min_area: int, rounds: int,
           max_objects: int, correction: str = "auto", with_everything: bool = False) -> pd.DataFrame:
    model = load_model(model_name)
    predictor = Predictor(model)
    rng = np.random.default_rng(0)
    rows = []
    for folder in data:
        dataset = load_dataset(folder)
        for sample in dataset.samples[:max_images]:
            image, mask = load_pair(sample)
            labels, ids = object_labels(mask, min_area=min_area)
            if len(ids) > max_objects:  # a seeded draw, as the benchmark's --max-objects
                ids = sorted(np.random.default_rng([0, len(rows)]).choice(ids, max_objects, replace=False).tolist())
            predictor.set_image(image)
            if with_everything:
                found = [(o.mask, list(o.box)) for o in find_objects(predictor)]
                # found objects no true object (of any size) matches: one click each to drop
                every_object = object_labels(mask, min_area=1)[0]
                truths = [every_object == value for value in np.unique(every_object) if value]
                spurious = sum(max((dice(m, t) for t in truths), default=0.0) < 0.5 for m, _ in found)
            for object_id in ids:
                gt = labels == object_id
                by_box = run_interactive(predictor, gt, Prompt(box=tight_box(gt)), rounds, rng, "largest",
                                         model.spec.default_mask_rule, correction)  # type: ignore[arg-type]
                by_clicks = run_interactive(predictor, gt, Prompt(points=[center_point(gt)]), rounds, rng, "largest",
                                            model.spec.default_mask_rule, correction  # type: ignore[arg-type]
                                            ) if model.spec.takes_point_prompts else None
                row = {"dataset": dataset.name, "image": sample.id, "object": int(object_id), "area": int(gt.sum()),
                       "polygon_vertices": polygon_vertices(gt),
                       "box_clicks": 1 + by_box.clicks_to_reach(TARGET),  # the box's two corners count as two
                       "box_reached": max(by_box.dice_per_round) >= TARGET}
                if by_clicks is not None:
                    row.update(click_clicks=by_clicks.clicks_to_reach(TARGET),
                               click_reached=max(by_clicks.dice_per_round) >= TARGET)
                if with_everything:
                    clicks, reached, found_dice = everything_first(
                        predictor, gt, found, (row["box_clicks"], row["box_reached"]), rounds, rng,
                        model.spec.default_mask_rule, correction)
                    row.update(found_clicks=clicks, found_reached=reached, found_dice=found_dice,
                               image_found=len(found), image_spurious=spurious)
                rows.append(row)
        print(f"{dataset.name}: {sum(r['dataset'] == dataset.name for r in rows)} objects", file=sys.stderr)
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    table = frame.groupby("dataset").agg(objects=("object", "size"), polygon_vertices=("polygon_vertices", "mean"),
                                         box_clicks=("box_clicks", "mean"), box_reached=("box_reached", "mean"))
    table["polygon_per_box_click"] = table.polygon_vertices / table.box_clicks
    if "click_clicks" in frame:
        clicks = frame.groupby("dataset").agg(click_clicks=("click_clicks", "mean"),
                                              click_reached=("click_reached", "mean"))
        table = table.join(clicks)
        table["polygon_per_click"] = table.polygon_vertices / table.click_clicks
    if "found_clicks" in frame:
        found = frame.groupby("dataset").agg(found_clicks=("found_clicks", "mean"),
                                             found_reached=("found_reached", "mean"),
                                             found_at_target=("found_clicks", lambda c: float((c == 0).mean())))
        images = frame.drop_duplicates(["dataset", "image"]).groupby("dataset").agg(
            found_per_image=("image_found", "mean"), spurious_per_image=("image_spurious", "mean"))
        table = table.join(found).join(images)
    return table.reset_index()


def speed(folder: Path, model_name: str, images: int, repeats: int, encoder: str, precision: str) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from sam4med.annotate.server import create_app
    from sam4med.annotate.session import AnnotationSession

    dataset = load_dataset(folder)
    samples = dataset.samples[:images]
    with tempfile.TemporaryDirectory() as scratch:
        for sample in samples:
            shutil.copy(sample.image_path, Path(scratch) / sample.image_path.name)
        session = AnnotationSession(scratch, load_model(model_name, encoder_backend=encoder, precision=precision))
        client = TestClient(create_app(session))

        def timed(call) -> float:  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            response = call()
            assert response.status_code == 200, response.text
            return time.perf_counter() - start

        session.prefetch = False
        first = timed(lambda: client.post("/api/images/0/open"))  # the process's first encoding (warm-up included)
        cold = timed(lambda: client.post("/api/images/2/open"))
        session.prefetch = True
        timed(lambda: client.post("/api/images/0/open"))
        session.wait_for_prefetch()
        prefetched = timed(lambda: client.post("/api/images/1/open"))
        session.wait_for_prefetch()
        cached = timed(lambda: client.post("/api/images/0/open"))
        _, mask = load_pair(samples[0])
        labels, ids = object_labels(mask, min_area=16)
        gt = labels == ids[0]
        box = [float(v) for v in tight_box(gt)]
        x, y = center_point(gt)
        box_ms, click_ms = [], []
        for _ in range(repeats):
            box_ms.append(timed(lambda: client.post("/api/images/0/segment", json={"object": 0, "box": box})))
            click_ms.append(timed(lambda: client.post("/api/images/0/segment", json={
                "object": 0, "box": box, "points": [[x, y]], "labels": [0]})))
        session.wait_for_prefetch()
        start = time.perf_counter()
        found = client.post("/api/images/0/everything", json={})  # the page's Everything (A), once: it takes seconds
        everything_s = time.perf_counter() - start
        assert found.status_code == 200, found.text
    return {"everything_s": everything_s, "everything_objects": len(found.json()["objects"]),
            "open_first_s": first, "open_new_s": cold, "open_prefetched_s": prefetched, "open_cached_s": cached,
            "box_to_mask_ms": 1000 * statistics.median(box_ms), "click_to_mask_ms": 1000 * statistics.median(click_ms),
            "image": samples[0].id, "size": f"{mask.shape[0]}x{mask.shape[1]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--model", default="litemedsam-click")
    parser.add_argument("--max-images", type=int, default=10)
    parser.add_argument("--min-area", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-objects", type=int, default=8, help="objects drawn per image (nuclei: hundreds)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/annotate-bench"))
    parser.add_argument("--correction", choices=CORRECTIONS, default="auto",
                        help="how a corrective click changes the mask (the annotator's --correction)")
    parser.add_argument("--skip-effort", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--everything", action="store_true",
                        help="also the effort from Everything first (the page's A; everything mode on each image)")
    args = parser.parse_args()
    configure_cpu(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for encoder, precision in () if args.skip_speed else (("torch", "fp32"), ("onnx", "fp32"), ("torch", "bf16")):
        report_speed(speed(args.data[0], args.model, 3, args.repeats, encoder, precision), args.model,
                     f"--encoder {encoder} --precision {precision}")
    if args.skip_effort:
        return
    frame = effort(args.data, args.model, args.max_images, args.min_area, args.rounds, args.max_objects,
                   args.correction, args.everything)
    frame.to_csv(args.out / "effort_objects.csv", index=False)
    table = summarise(frame)
    table.to_csv(args.out / "effort.csv", index=False)
    print(f"effort to Dice {TARGET} ({args.model}, --correction {args.correction}; first {args.max_images} images "
          f"per set, at most {args.max_objects} objects >= {args.min_area} px each, at most {args.rounds} corrective "
          "clicks, seed 0):")
    print(table.round(2).to_string(index=False))


def report_speed(figures: dict[str, float], model: str, options: str) -> None:
    print(f"speed ({model}, {options}, {figures['image']} {figures['size']}): "
          f"open first {figures['open_first_s']:.2f} s, "
          f"open new {figures['open_new_s']:.2f} s, "
          f"after prefetch {figures['open_prefetched_s']:.2f} s, cached {figures['open_cached_s']:.2f} s; "
          f"box to mask {figures['box_to_mask_ms']:.0f} ms, "
          f"click to mask {figures['click_to_mask_ms']:.0f} ms (median); "
          f"everything {figures['everything_s']:.2f} s ({figures['everything_objects']} objects)")


if __name__ == "__main__":
    main()
