"""The resumable item loop: rows per image, failures as rows, cut blocks redone, nothing done twice."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sam4med.engine.datasets import Dataset, Sample
from sam4med.engine.errors import InputError
from sam4med.engine.items import WorkItem, run_items
from sam4med.engine.runs import read_jsonl


def items(names: list[str], dataset: str = "toy") -> list[WorkItem]:
    data = Dataset(dataset, "test", "test", Path("."), [Sample(n, Path(f"{n}.png")) for n in names])
    return [WorkItem(data, s) for s in data.samples]


def two_rows(item: WorkItem) -> list[dict]:
    if item.sample.id == "bad":
        raise InputError(f"{item.sample.image_path}: cannot read image")
    if item.sample.id == "crash":
        raise ZeroDivisionError("division by zero")
    return [{"dataset": item.dataset.name, "image": item.sample.id, "object": k} for k in range(2)]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_and_failures_are_recorded_and_a_rerun_does_nothing_again(tmp_path):
    results = tmp_path / "results.jsonl"
    work = items(["a", "bad", "crash", "b"])
    summary = run_items(work, two_rows, results, "test", lambda item: {"extra": None}, show_progress=False)
    assert (summary.computed, summary.skipped, summary.failed) == (2, 0, 2)
    rows = read(results)
    assert [(r["image"], r["status"]) for r in rows] == [("a", "ok"), ("a", "ok"), ("bad", "error"),
                                                         ("crash", "error"), ("b", "ok"), ("b", "ok")]
    assert rows[2]["error"] == "bad.png: cannot read image" and rows[2]["extra"] is None
    assert rows[3]["error"].startswith("ZeroDivisionError: division by zero (two_rows)")
    assert all(r["image_rows"] == (1 if r["status"] == "error" else 2) for r in rows)
    again = run_items(work, two_rows, results, "test", show_progress=False)
    assert (again.computed, again.skipped, again.failed, again.failed_before) == (0, 4, 0, 2)
    assert again.describe() == "0 computed, 4 already there (2 of them failed before), 0 failed"
    assert read(results) == rows


def test_a_block_cut_by_a_kill_is_dropped_and_redone(tmp_path):
    results = tmp_path / "results.jsonl"
    run_items(items(["a", "b"]), two_rows, results, "test", show_progress=False)
    complete = results.read_text()
    lines = complete.splitlines(keepends=True)
    results.write_text(lines[0] + lines[1] + lines[2] + lines[3][:10])  # b's second row cut mid-line
    summary = run_items(items(["a", "b"]), two_rows, results, "test", show_progress=False)
    assert (summary.computed, summary.skipped) == (1, 1)
    assert results.read_text() == complete


def test_the_same_image_twice_in_one_run_is_done_once(tmp_path):
    results = tmp_path / "results.jsonl"
    summary = run_items(items(["a", "a"]), two_rows, results, "test", show_progress=False)
    assert (summary.computed, summary.skipped) == (1, 1) and len(read(results)) == 2


@pytest.mark.parametrize("cut", [0, 1])
def test_items_of_two_data_sets_with_one_id_are_kept_apart(tmp_path, cut):
    results = tmp_path / "results.jsonl"
    run_items(items(["a"], "one")[cut:] + items(["a"], "two"), two_rows, results, "test", show_progress=False)
    assert {r["dataset"] for r in read(results)} == ({"one", "two"} if cut == 0 else {"two"})


def test_a_damaged_middle_line_is_reported_and_its_image_redone(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    run_items(items(["a", "b", "c"]), two_rows, results, "test", show_progress=False)
    complete = results.read_text()
    lines = complete.splitlines(keepends=True)
    lines[2] = '{"dataset": "toy", "ima\x00ge"\n'  # b's first row damaged in the middle of the file
    results.write_text("".join(lines))
    summary = run_items(items(["a", "b", "c"]), two_rows, results, "test", show_progress=False)
    assert (summary.computed, summary.skipped) == (1, 2)
    assert sorted(read(results), key=lambda r: r["image"]) == sorted(
        [json.loads(line) for line in complete.splitlines()], key=lambda r: r["image"])
    err = capsys.readouterr().err
    assert "line 3 is damaged" in err and "1 image(s) with missing or damaged rows are computed again" in err


def test_a_full_disk_stops_the_loop_and_leaves_what_was_written_readable(small_disk):
    results = small_disk / "results.jsonl"
    work = items([f"i{n:02d}" for n in range(20)])

    def big_rows(item: WorkItem) -> list[dict]:
        return [{"dataset": item.dataset.name, "image": item.sample.id, "payload": "x" * 6000} for _ in range(2)]

    with pytest.raises(OSError) as error:
        run_items(work, big_rows, results, "test", show_progress=False)
    assert error.value.errno == errno.ENOSPC
    rows = read_jsonl(results)  # what was written whole is readable; a cut block at the end is left out
    assert 0 < len({row["image"] for row in rows}) < len(work)
    assert all(len(row["payload"]) == 6000 for row in rows)


def test_an_output_disk_that_refuses_stops_the_loop_and_an_image_error_does_not(tmp_path):
    """ENOSPC or a read-only file system while an item writes its files fails every later item too: the run
    stops with the error (and resumes later); another OSError belongs to its image and becomes a row."""
    def writes(item: WorkItem) -> list[dict]:
        if item.sample.id == "gone":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "gone.png")
        if item.sample.id == "full":
            raise OSError(errno.ENOSPC, "No space left on device", "out/full.npz")
        return [{"dataset": item.dataset.name, "image": item.sample.id}]

    results = tmp_path / "results.jsonl"
    with pytest.raises(OSError, match="No space left on device"):
        run_items(items(["a", "gone", "full", "b"]), writes, results, "test", show_progress=False)
    assert [(r["image"], r["status"]) for r in read(results)] == [("a", "ok"), ("gone", "error")]


def test_an_image_or_mask_replaced_under_its_id_is_done_again(tmp_path, capsys):
    """Rows keep the sha256 of the files they were made from; resuming redoes what changed, and only that."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(f"image {name}".encode())
        (tmp_path / f"{name}_mask.png").write_bytes(f"mask {name}".encode())
    data = Dataset("toy", "test", "test", tmp_path, [Sample(n, tmp_path / f"{n}.png", tmp_path / f"{n}_mask.png")
                                                     for n in ("a", "b", "c")] + [Sample("gone", tmp_path / "gone.png")])
    work = [WorkItem(data, s) for s in data.samples]
    results = tmp_path / "results.jsonl"
    run_items(work, two_rows, results, "test", show_progress=False)
    first = {r["image"]: r for r in read(results)}
    assert first["a"]["image_sha256"] == hashlib.sha256(b"image a").hexdigest()
    assert first["a"]["mask_sha256"] == hashlib.sha256(b"mask a").hexdigest()
    assert first["gone"]["image_sha256"] is None and first["gone"]["mask_sha256"] is None
    assert run_items(work, two_rows, results, "test", show_progress=False).computed == 0
    assert "computed again" not in capsys.readouterr().err

    (tmp_path / "a.png").write_bytes(b"another image a")
    (tmp_path / "b_mask.png").write_bytes(b"another mask b")
    (tmp_path / "gone.png").write_bytes(b"image gone, now there")
    again = run_items(work, two_rows, results, "test", show_progress=False)
    assert (again.computed, again.skipped) == (3, 1)
    assert "3 finished image(s) whose outputs are damaged, missing or out of date are computed again" in \
        capsys.readouterr().err
    rows = read(results)
    assert [r["image"] for r in rows].count("a") == 2  # redone once, its old rows gone
    assert {r["image"]: r["image_sha256"] for r in rows}["a"] == hashlib.sha256(b"another image a").hexdigest()

    # rows written before the hashes were kept are taken as they are
    results.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_sha256")}) + "\n"
                               for r in rows))
    (tmp_path / "c.png").write_bytes(b"changed, but its rows cannot tell")
    assert run_items(work, two_rows, results, "test", show_progress=False).computed == 0


def test_a_run_logged_to_a_file_says_how_far_it_is(tmp_path, capsys, monkeypatch):
    """Under nohup or a batch scheduler there is no terminal for the progress bar: the loop writes a line
    each LOG_SECONDS (here every image) with the count, the failures and the time left."""
    from sam4med.engine import items as loop

    results = tmp_path / "results.jsonl"
    run_items(items(["a"]), two_rows, results, "test", show_progress=False)  # done before: counted, not redone
    monkeypatch.setattr(loop, "LOG_SECONDS", 0.0)
    run_items(items(["a", "b", "bad", "c"]), two_rows, results, "bench")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench: ")]
    assert [line.split(",")[0] for line in lines] == ["bench: 2 of 4 images (0 failed)", "bench: 3 of 4 images (1 failed)",
                                                      "bench: 4 of 4 images (1 failed)"]
    assert lines[-1].endswith("about 0 min left")


def test_a_second_run_into_a_folder_another_process_is_writing_is_refused_and_adds_nothing(tmp_path, held_elsewhere):
    results = tmp_path / "results.jsonl"
    run_items(items(["a"]), two_rows, results, "test", show_progress=False)
    before = results.read_bytes()
    with held_elsewhere(tmp_path) as pid:
        with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path))}: another run \\(process {pid}\\) is "
                                             "writing into this folder; let it finish or choose another --out$"):
            run_items(items(["a", "b"]), two_rows, results, "test", show_progress=False)
        assert results.read_bytes() == before
    summary = run_items(items(["a", "b"]), two_rows, results, "test", show_progress=False)  # once it has let go
    assert (summary.computed, summary.skipped) == (1, 1) and len(read(results)) == 4
    assert not (tmp_path / ".sam4med.lock").exists()  # the folder holds what the run wrote, nothing else


def test_a_folder_whose_writer_was_killed_is_not_held(tmp_path):
    script = ("import os, signal, sys; from pathlib import Path; from sam4med.engine.runs import sole_writer\n"
              "with sole_writer(Path(sys.argv[1])):\n    os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == -signal.SIGKILL
    assert (tmp_path / ".sam4med.lock").exists()  # what a kill leaves behind
    summary = run_items(items(["a"]), two_rows, tmp_path / "results.jsonl", "test", show_progress=False)
    assert summary.computed == 1 and not (tmp_path / ".sam4med.lock").exists()
