"""Output folders: a resumed folder loses the half-written files of killed writers, and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sam4med.engine.errors import InputError
from sam4med.engine.runs import atomic_path, claim_folder

KILLED_WRITER = """
import os, signal, sys
from sam4med.engine.runs import atomic_path
with atomic_path(sys.argv[1]) as temporary:
    temporary.write_bytes(b"half an image")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_resumed_folder_loses_what_killed_writers_left_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    claim_folder(out, "protocol.json", {"seed": 0})
    (out / "overlays").mkdir()
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out / "overlays" / "a.png")], check=False)
    left = list(out.rglob(".tmp.*"))
    assert [p.name.rsplit(".", 2)[-2:] for p in left] == [["a", "png"]]  # the kill skipped atomic_path's clean-up
    host = left[0].name.split(".")[2]
    other_machine = out / f".tmp.{'0' * 8 if host != '0' * 8 else '1' * 8}.1.b.png"
    other_machine.write_bytes(b"a Ray worker elsewhere, still writing")
    with atomic_path(out / "overlays" / "c.png") as live:
        live.write_bytes(b"this process, still writing")
        claim_folder(out, "protocol.json", {"seed": 0})  # the same run, resumed
        assert not left[0].exists()
        assert live.exists() and other_machine.exists()
    assert (out / "overlays" / "c.png").read_bytes() == b"this process, still writing"
    assert not (out / "overlays" / "a.png").exists()


def test_a_name_near_the_file_system_limit_is_written_and_one_past_it_names_the_file(tmp_path):
    near = tmp_path / ("a" * 245 + ".nii.gz")  # fits; with atomic_path's prefix it would not
    with atomic_path(near) as temporary:
        assert len(temporary.name) <= 255 and temporary.name.endswith(".nii.gz")
        temporary.write_bytes(b"labels")
    assert near.read_bytes() == b"labels"
    past = tmp_path / ("b" * 256 + ".png")
    with pytest.raises(OSError) as raised:
        with atomic_path(past) as temporary:
            temporary.write_bytes(b"mask")
    assert raised.value.filename == str(past)
    assert sorted(p.name for p in tmp_path.iterdir()) == [near.name]  # no temporary left behind


def test_a_folder_holding_another_runs_rows_is_not_claimed_by_another_record(tmp_path):
    """Item-loop verbs share results.jsonl: priors, predictions and embeddings each keep theirs apart."""
    claim_folder(tmp_path / "priors", "priors.json", {"key": "a"})
    (tmp_path / "priors" / "results.jsonl").write_text('{"image": "im00", "masks": 3}\n')
    with pytest.raises(InputError, match="holds another run's results.jsonl .no protocol.json of this one"):
        claim_folder(tmp_path / "priors", "protocol.json", {"task": "samaug predict"})
    claim_folder(tmp_path / "priors", "priors.json", {"key": "a"})  # its own run, resumed
    assert (tmp_path / "priors" / "results.jsonl").read_text() == '{"image": "im00", "masks": 3}\n'
    assert not (tmp_path / "priors" / "protocol.json").exists()


def test_a_checkpoint_named_by_another_path_of_the_same_file_resumes_and_another_file_is_refused(tmp_path, monkeypatch):
    """Runs record file settings absolute (cli.options.recorded_path); older runs recorded them as typed."""
    from sam4med.cli.options import recorded_path

    (tmp_path / "runs").mkdir()
    weights = tmp_path / "runs" / "v7.pt"
    weights.write_bytes(b"weights")
    (tmp_path / "runs" / "other.pt").write_bytes(b"weights")  # the same bytes, another file
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    claim_folder(out, "config.json", {"init_weights": "runs/v7.pt", "seed": 0})  # recorded as typed
    for typed in (str(weights), "./runs/v7.pt", recorded_path(weights.relative_to(tmp_path))):
        claim_folder(out, "config.json", {"init_weights": typed, "seed": 0})
    assert recorded_path(weights.relative_to(tmp_path)) == str(weights.resolve())
    assert recorded_path(tmp_path / "absent.pt") == str(tmp_path / "absent.pt")  # its error names it as typed
    for typed in ("runs/other.pt", "runs/absent.pt"):
        with pytest.raises(InputError, match="other settings .init_weights differ"):
            claim_folder(out, "config.json", {"init_weights": typed, "seed": 0})
    claim_folder(tmp_path / "named", "config.json", {"name": "runs/v7.pt"})
    with pytest.raises(InputError, match="other settings .name differ"):  # only settings that name a file
        claim_folder(tmp_path / "named", "config.json", {"name": "./runs/v7.pt"})
    monkeypatch.chdir(out)  # another working directory: an absolute record still matches
    claim_folder(tmp_path / "abs", "config.json", {"checkpoint": recorded_path(weights), "seed": 0})
    claim_folder(tmp_path / "abs", "config.json", {"checkpoint": "../runs/v7.pt", "seed": 0})


def test_two_threads_writing_one_file_at_once_both_finish(tmp_path):
    """The annotation page's background encoding and a request may cache the same embedding together: each writer
    has a temporary of its own (one per thread), so neither renames the other's away."""
    import threading

    path = tmp_path / "embedding.pt"
    both_written = threading.Barrier(2)
    failures = []

    def write(data: bytes) -> None:
        try:
            with atomic_path(path) as temporary:
                temporary.write_bytes(data)
                both_written.wait(timeout=10)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=write, args=(data,)) for data in (b"first", b"second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and path.read_bytes() in (b"first", b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["embedding.pt"]


def test_a_training_runs_folder_and_a_batch_verbs_folder_are_kept_apart(tmp_path):
    """`samaug predict --out RUN` wrote its masks, rows and protocol.json into a training run's folder."""
    claim_folder(tmp_path / "run", "config.json", {"epochs": 3})
    with pytest.raises(InputError, match=r"run: holds another kind of run \(config.json\)"):
        claim_folder(tmp_path / "run", "protocol.json", {"task": "samaug predict"})
    claim_folder(tmp_path / "predictions", "protocol.json", {"task": "samaug predict"})
    with pytest.raises(InputError, match=r"predictions: holds another kind of run \(protocol.json\)"):
        claim_folder(tmp_path / "predictions", "config.json", {"epochs": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions", "run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]
