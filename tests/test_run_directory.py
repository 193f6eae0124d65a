"""A run directory that knows its options, and reruns that finish what a kill left
(docs/RELIABILITY.md#run-directory-options, #crash-safety)."""

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from incseg_fast.train import CheckpointError, RunOptionsError, TrainConfig, load_checkpoint, run, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, method="ft", **overrides):
    base = dict(
        dataset="synthetic",
        task="15-5",
        mode="disjoint",
        method=method,
        out=str(out),
        image_size=32,
        train_images=48,
        val_images=16,
        epochs=1,
        batch_size=8,
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch):
    raise Interrupt


def _interrupted_step1(out, **overrides):
    """A run killed during step 1: step 0 final, step 1 with one of two epochs done."""
    cfg = tiny(out, "mib", epochs_incremental=2, **overrides)
    train_step(cfg, 0)
    with pytest.raises(Interrupt):
        train_step(cfg, 1, on_epoch_end=_stop_after_first_epoch)
    assert (out / "mib" / "step1.partial.pt").exists()
    return cfg


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_a_step_committed_before_its_metrics_is_reported_on_rerun(tmp_path):
    cfg = tiny(tmp_path)
    run(cfg)
    expected = _results(tmp_path)
    # what a kill between step 1's checkpoint and its metrics left: step1.pt, reports of step 0
    metrics = tmp_path / "ft" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text())[:1]))
    (tmp_path / "results.json").write_text(json.dumps({"ft": expected["ft"][:1]}))
    entries = run(cfg)
    assert [e["step"] for e in entries] == [0, 1]
    assert _results(tmp_path) == expected
    assert [e["step"] for e in json.loads(metrics.read_text())] == [0, 1]


def test_a_rerun_with_other_options_stops_and_names_the_option(tmp_path):
    run(tiny(tmp_path))
    with pytest.raises(
        RunOptionsError,
        match=r"ft holds results of --lr-incremental 0\.05, not --lr-incremental "
        r"0\.02: rerun with the same options, use a new --out, or pass "
        r"--overwrite",
    ):
        run(tiny(tmp_path, lr_incremental=0.02))


def test_a_partial_step_does_not_resume_under_other_options(tmp_path):
    _interrupted_step1(tmp_path)
    for change, flag in (
        (dict(epochs_incremental=3), "--epochs-incremental 2, not --epochs-incremental 3"),
        (dict(lr_incremental=0.01), "--lr-incremental 0.05, not --lr-incremental 0.01"),
        (dict(backbone="small"), "--backbone tiny, not --backbone small"),
    ):
        with pytest.raises(RunOptionsError, match=flag):
            train_step(tiny(tmp_path, "mib", **{"epochs_incremental": 2, **change}), 1)


def test_a_later_step_does_not_train_with_another_architecture(tmp_path):
    train_step(tiny(tmp_path), 0)
    with pytest.raises(RunOptionsError, match="--backbone tiny, not --backbone small"):
        train_step(tiny(tmp_path, backbone="small"), 1)
    assert not (tmp_path / "ft" / "step1.pt").exists()


def test_overwrite_discards_the_results_of_other_options(tmp_path, capsys):
    _interrupted_step1(tmp_path / "run")
    cfg = tiny(tmp_path / "run", "mib", epochs_incremental=3)
    got = run(cfg, overwrite=True)
    assert "--overwrite: " in capsys.readouterr().out
    fresh = run(tiny(tmp_path / "fresh", "mib", epochs_incremental=3))
    assert [e["miou_all"] for e in got] == [e["miou_all"] for e in fresh]
    assert json.loads((tmp_path / "run" / "mib" / "options.json").read_text())["epochs_incremental"] == 3
    run(cfg, overwrite=True)  # the same options again: a resume that finds everything done


def test_options_that_do_not_change_results_do_not_block(tmp_path):
    run(tiny(tmp_path))
    entries = run(tiny(tmp_path, loss_backend="reference", workers=1, progress=True, device="auto"))
    assert [e["step"] for e in entries] == [0, 1]


def test_methods_in_one_folder_share_the_data_and_task_options(tmp_path):
    run(tiny(tmp_path))
    with pytest.raises(RunOptionsError, match="holds results of --mode disjoint, not --mode overlapped"):
        run(tiny(tmp_path, "mib", mode="overlapped"))
    run(tiny(tmp_path, "mib", mode="overlapped"), overwrite=True)
    assert not (tmp_path / "ft").exists()  # ft's results were for the other task options
    assert list(_results(tmp_path)) == ["mib"]


def test_results_without_recorded_options_are_not_continued(tmp_path):
    run(tiny(tmp_path))
    (tmp_path / "ft" / "options.json").unlink()  # as incseg_fast 0.1 left its run folders
    with pytest.raises(RunOptionsError, match="without a record of their options"):
        run(tiny(tmp_path))
    run(tiny(tmp_path), overwrite=True)


def test_a_rerun_removes_what_a_kill_left(tmp_path):
    cfg = tiny(tmp_path)
    train_step(cfg, 0)
    finished = load_checkpoint(tmp_path / "ft" / "step0.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [
        tmp_path / f"results.json.{dead.stdout.strip()}.tmp",
        tmp_path / "ft" / f"step1.pt.{dead.stdout.strip()}.tmp",
    ]
    live = tmp_path / f"results.md.{os.getppid()}.tmp"  # a run that is still writing it
    for path in stale + [live]:
        path.write_bytes(b"half a file")
    torch.save({}, tmp_path / "ft" / "step0.partial.pt")  # left by a kill right after step 0's commit
    run(cfg)
    assert not any(p.exists() for p in stale) and live.exists()
    assert not (tmp_path / "ft" / "step0.partial.pt").exists()
    assert torch.equal(
        load_checkpoint(tmp_path / "ft" / "step0.pt")["state_dict"]["classifier.heads.0.bias"],
        finished["state_dict"]["classifier.heads.0.bias"],
    )


# ---------------------------------------------------------------- damaged and foreign checkpoints


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Finished runs to copy: mib and caf of 15-5 in one folder, mib of 15-1 trained to step 1."""
    root = tmp_path_factory.mktemp("finished")
    run(tiny(root / "15-5", "mib"))
    run(tiny(root / "15-5", "caf"))
    run(tiny(root / "15-1", "mib", task="15-1", mode="overlapped"), steps=[0, 1])
    return root


def _copy(finished, tmp_path, task="15-5"):
    out = tmp_path / task
    shutil.copytree(finished / task, out)
    return out


def _refused(path, *words):
    """pytest.raises for a CheckpointError whose one line names ``path`` and holds ``words``."""
    return pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + ".*".join(map(re.escape, words)))


@pytest.mark.parametrize("damage", ["truncated", "a flipped bit", "a zeroed tail"])
def test_a_damaged_final_checkpoint_is_named_on_rerun(finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    path = out / "mib" / "step1.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:-4096]
    elif damage == "a flipped bit":
        data[-2000] ^= 0x10
    else:
        data[-4096:] = bytes(4096)
    path.write_bytes(bytes(data))
    reports = (out / "results.json").read_text()
    with _refused(path, "truncated" if damage == "truncated" else "corrupt"):
        run(tiny(out, "mib"))
    assert (out / "results.json").read_text() == reports


def test_a_foreign_final_checkpoint_is_refused(finished, tmp_path):
    out, other_task = _copy(finished, tmp_path), _copy(finished, tmp_path, "15-1")
    target = out / "mib" / "step1.pt"
    for foreign, words in (
        (out / "caf" / "step1.pt", ["--method caf", "not", "--method mib"]),
        (other_task / "mib" / "step1.pt", ["--task 15-1", "not", "--task 15-5"]),
    ):
        shutil.copyfile(foreign, target)
        with _refused(target, *words):
            run(tiny(out, "mib"))
    shutil.copyfile(finished / "15-5" / "mib" / "step1.pt", other_task / "mib" / "step1.pt")
    with _refused(other_task / "mib" / "step1.pt", "--task 15-5", "not", "--task 15-1"):
        run(tiny(other_task, "mib", task="15-1", mode="overlapped"), steps=[0, 1, 2])


def test_a_foreign_partial_checkpoint_is_not_resumed(finished, tmp_path):
    _interrupted_step1(tmp_path / "interrupted")
    other_task = _copy(finished, tmp_path, "15-1")
    partial = other_task / "mib" / "step2.partial.pt"
    shutil.copyfile(tmp_path / "interrupted" / "mib" / "step1.partial.pt", partial)
    with _refused(partial, "step 1", "not", "step 2"):
        train_step(tiny(other_task, "mib", task="15-1", mode="overlapped"), 2)


def test_a_step_copied_over_another_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    os.replace(out / "mib" / "step1.pt", out / "mib" / "step0.pt")
    reports = (out / "results.json").read_text()
    with _refused(out / "mib" / "step0.pt", "step 1", "not", "step 0"):
        run(tiny(out, "mib"), steps=[0])
    assert (out / "results.json").read_text() == reports


def test_only_the_checkpoints_on_disk_are_reported(finished, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "mib" / "step1.pt").unlink()
    entries = run(tiny(out, "mib"), steps=[0])
    assert [e["step"] for e in entries] == [0]
    assert [e["step"] for e in _results(out)["mib"]] == [0]
    assert [e["step"] for e in _results(out)["caf"]] == [0, 1]
    assert [e["step"] for e in json.loads((out / "mib" / "metrics.json").read_text())] == [0]


def test_a_symlinked_method_folder_is_refused_before_anything_is_removed(finished, tmp_path):
    out = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.replace(out / "mib", elsewhere)
    (out / "mib").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    for overwrite in (True, False):
        with pytest.raises(RunOptionsError, match=re.escape(f"{out / 'mib'} is a symbolic link")):
            run(tiny(out, "mib", lr_incremental=0.02), overwrite=overwrite)
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert (out / "caf" / "step1.pt").exists()


def _read_only(monkeypatch, folder: Path) -> None:
    """Every change under ``folder`` fails with EROFS, as on a read-only filesystem, whether the
    file exists or not (root ignores permission bits, so a chmod cannot make a folder read-only)."""

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(folder) + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def guard(original):
        return lambda path, *args, **kwargs: refuse(path) if inside(path) else original(path, *args, **kwargs)

    real_open = builtins.open

    def guarded_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and inside(path) and set(mode) & set("wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    for name in ("unlink", "remove", "rmdir", "mkdir", "replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    monkeypatch.setattr(builtins, "open", guarded_open)


def test_a_finished_run_on_a_read_only_filesystem_is_reported(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    expected = _results(out)
    _read_only(monkeypatch, out)
    entries = run(tiny(out, "mib"))
    assert [e["step"] for e in entries] == [0, 1]
    assert _results(out) == expected
