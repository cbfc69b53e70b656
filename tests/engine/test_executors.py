"""The benchmark on Ray actors gives the local run's rows, resumes after its driver is killed, and records a
failing image as a row; without Ray, --ray says how to install it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from sam4med.engine.errors import InputError
from sam4med.engine.executors import RayExecutor, make_executor
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import PromptSettings

from conftest import write_dataset

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'sam4med[distributed]')")

FAST_MODES = ("box", "box_jitter", "points2_neg2", "interactive")
CONFIG = BenchmarkConfig(modes=FAST_MODES, prompts=PromptSettings(interactive_rounds=2))


@pytest.fixture(scope="module")
def local_cluster():
    """A local Ray cluster of 2 CPUs for this module's tests."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def rows(folder):
    """Rows without timing fields, in a stable order (Ray writes them as images finish)."""
    lines = (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted(json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith("_s")}, sort_keys=True)
                  for line in lines)


def test_ray_rows_equal_the_local_rows(local_cluster, click_model, tmp_path):
    data = write_dataset(tmp_path / "ellipses", count=4)  # and one truncated image: an error row on both
    run_benchmark([data], tmp_path / "local", CONFIG, model=click_model, show_progress=False)
    run_benchmark([data], tmp_path / "ray", CONFIG, model=click_model, show_progress=False,
                  executor=RayExecutor(workers=2))
    local, distributed = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert len(local) == 4 * len(FAST_MODES) + 1 and sum('"status": "error"' in r for r in local) == 1
    # one thread per actor against the default here: same masks; Dice and predicted IoU equal to float rounding
    for mine, theirs in zip(local, distributed):
        a, b = json.loads(mine), json.loads(theirs)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=1e-5, nan_ok=True), key  # float32 sums in another order
            else:
                assert a[key] == b[key], key


KILLED_RAY_BENCHMARK = """
import sys
from sam4med.engine.executors import RayExecutor
from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
from sam4med.evaluation.modes import PromptSettings
config = BenchmarkConfig(modes=tuple(sys.argv[3].split(",")), prompts=PromptSettings(interactive_rounds=2))
run_benchmark([sys.argv[1]], sys.argv[2], config, device="cpu", show_progress=False, executor=RayExecutor(sys.argv[4], 2))
"""


def test_a_ray_run_whose_driver_is_killed_resumes_without_loss_or_duplicates(local_cluster, click_model, tmp_path):
    data = write_dataset(tmp_path / "ellipses", count=6, broken=False)
    run_benchmark([data], tmp_path / "whole", CONFIG, model=click_model, show_progress=False)
    address = ray.get_runtime_context().gcs_address
    killed = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-c", KILLED_RAY_BENCHMARK, str(data), str(killed),
                               ",".join(FAST_MODES), address])
    deadline = time.time() + 300
    results = killed / "results.jsonl"
    while driver.poll() is None and time.time() < deadline and \
            not (results.is_file() and results.read_text().count("\n") >= len(FAST_MODES)):
        time.sleep(0.05)  # at least one image written
    driver.kill()
    driver.wait()
    assert len(rows(killed)) < 6 * len(FAST_MODES)  # killed before the end
    run_benchmark([data], killed, CONFIG, model=click_model, show_progress=False, executor=RayExecutor(workers=2))
    finished, expected = rows(killed), rows(tmp_path / "whole")
    assert len(finished) == len(set(finished)) == len(expected)
    for mine, theirs in zip(finished, expected):
        a, b = json.loads(mine), json.loads(theirs)
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
            {k: v for k, v in b.items() if not isinstance(v, float)}
        assert np.allclose([v for v in a.values() if isinstance(v, float)],
                           [v for v in b.values() if isinstance(v, float)], atol=1e-6, equal_nan=True)


def test_bad_ray_settings_are_one_line():
    with pytest.raises(InputError, match="--ray-workers: only with --ray"):
        make_executor(None, 2)
    with pytest.raises(InputError, match="--ray-workers 0"):
        make_executor("auto", 0)
    with pytest.raises(InputError, match="^--threads 0: must be >= 1$"):  # was taken as 1
        make_executor("auto", None, 0)


def test_priors_and_embeddings_on_ray_equal_the_local_ones(local_cluster, litemedsam, tmp_path):
    from sam4med.clicks.embeddings import embed_datasets, load_embedding
    from sam4med.engine.datasets import load_datasets
    from sam4med.samaug.store import PriorStore, generate_priors

    data = write_dataset(tmp_path / "ellipses", count=3, broken=False)
    for where, executor in (("local", None), ("ray", RayExecutor(workers=2))):
        generate_priors([data], tmp_path / where / "priors", litemedsam, figures_per_dataset=0, show_progress=False,
                        executor=executor)
        [dataset] = load_datasets([data])
        embed_datasets(litemedsam, {dataset.name: (dataset, dataset.samples)}, tmp_path / where / "embeddings",
                       flips=(False,), show_progress=False, executor=executor)
    local, distributed = PriorStore(tmp_path / "local" / "priors" / "ellipses"), \
        PriorStore(tmp_path / "ray" / "priors" / "ellipses")
    for image_id in ("case0", "case1", "case2"):
        a, b = local.load(image_id), distributed.load(image_id)
        assert a.masks == b.masks >= 1
        np.testing.assert_allclose(a.segmentation, b.segmentation, atol=1e-5)
        assert (a.boundary != b.boundary).mean() < 1e-3
        features, labels = load_embedding(tmp_path / "local" / "embeddings" / "ellipses" / f"{image_id}.pt")
        ray_features, ray_labels = load_embedding(tmp_path / "ray" / "embeddings" / "ellipses" / f"{image_id}.pt")
        assert (labels == ray_labels).all() and float((features - ray_features).abs().max()) < 1e-2  # fp16 storage


class DiesOnce:
    """Rows of an image; the worker process dies (as a killed one does) the first time it meets ``victim``."""

    def __init__(self, marker, victim):
        self.marker, self.victim = marker, victim

    def __call__(self, item):
        if item.sample.id == self.victim and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return [{"dataset": item.dataset.name, "image": item.sample.id, "value": len(item.sample.id)}]


def test_a_worker_that_dies_is_replaced_and_no_row_is_lost_or_doubled(local_cluster, tmp_path):
    from sam4med.engine.datasets import load_datasets
    from sam4med.engine.items import WorkItem, run_items

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    [dataset] = load_datasets([write_dataset(tmp_path / "ellipses", broken=False, count=5)])
    items = [WorkItem(dataset, sample) for sample in dataset.samples]
    results = tmp_path / "results.jsonl"
    summary = run_items(items, DiesOnce(tmp_path / "died", "case2"), results, "test", show_progress=False,
                        executor=RayExecutor(workers=2))
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert (tmp_path / "died").exists() and summary.failed == 0
    assert sorted(row["image"] for row in rows) == [f"case{i}" for i in range(5)]
