"""The evaluation scripts under hostile inputs: nan/inf in saved features, a split file that is not UTF-8, more
k-means clusters than val images, a full disk under --save-features / --output-json, and eval_linear.py /
eval_frozen.py copied without eval_knn.py. Each ends with exit status 2, exactly one `error:` line naming the fix,
no traceback and nothing partial left behind (docs/guarantees.md)."""
import errno
import json
import shutil

import pytest
import torch

import eval_frozen
import eval_knn
from conftest import ROOT, TINY, run_inprocess, write_image_folder, write_mae_release_checkpoint
from test_copy import one_error_line, run_copy
from test_hardening import assert_one_line_error, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    write_image_folder(d / "imgs", classes=("a", "b", "c", "d"), per_class=3)
    write_mae_release_checkpoint(d / "ck.pth")
    return d


def features_file(path, n_val=8, bad=None):
    """A file as eval_knn.py --save-features writes it: 8 train and n_val val features of 4 classes; `bad`: the key
    whose column 3 is nan in every row (so any few-shot split meets it)."""
    g = torch.Generator().manual_seed(0)
    obj = {"train_features": torch.randn(8, 16, generator=g), "train_labels": torch.arange(8) % 4,
           "val_features": torch.randn(n_val, 16, generator=g), "val_labels": torch.arange(n_val) % 4}
    if bad:
        obj[bad][:, 3] = float("nan")
    torch.save(obj, path)
    return path


def run_case(capsys, tmp_path, module, argv, *needles):
    """One error line with `needles`; not a file created or changed under tmp_path."""
    before = snapshot(tmp_path)
    code, _, err = run_inprocess(capsys, module, *argv)
    line = assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == before
    return line


@pytest.mark.parametrize("bad, mode", [("val_features", ["--cluster"]), ("train_features", ["--few-shot", "1"])])
def test_nan_in_saved_features(capsys, tmp_path, bad, mode):
    f = features_file(tmp_path / "feats.pth", bad=bad)
    run_case(capsys, tmp_path, eval_frozen, ["--features", f, *mode, "--output-json", tmp_path / "r.json"],
             f"--features {f}", f"'{bad}'", "nan/inf", "eval_knn.py --save-features")


def test_split_file_not_utf8(capsys, tmp_path, data):
    bad = tmp_path / "1imgs_class.txt"
    bad.write_bytes(b"a/0.png\nb/\xff\xfe1.png\n")  # e.g. a Latin-1 or UTF-16 file
    run_case(capsys, tmp_path, eval_frozen, ["--checkpoint", data / "ck.pth", "--data", data / "imgs", *TINY,
                                             "--split-file", bad], f"--split-file {bad}", "UTF-8", "line 2")


def test_more_clusters_than_val_images(capsys, tmp_path):
    f = features_file(tmp_path / "feats.pth", n_val=3)  # 4 classes (train), 3 val images
    run_case(capsys, tmp_path, eval_frozen, ["--features", f, "--cluster"], "k-means", "4 clusters", "3 val images")


def _full_disk_torch_save(obj, f, *a, **kw):
    """torch.save on a full disk: part of the file is written, then torch's zip writer raises a RuntimeError whose
    context is the OSError (as measured with RLIMIT_FSIZE)."""
    fh = open(f, "wb") if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__") else f
    try:
        fh.write(b"PK\x03\x04 partial archive")
        fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    finally:
        if fh is not f:
            fh.close()


def _full_disk_json_dump(obj, f, *a, **kw):
    f.write('{"protocol": {"checkp')
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("script, flag", [("eval_knn", "--save-features"), ("eval_knn", "--output-json"),
                                          ("eval_frozen", "--output-json")])
def test_full_disk_leaves_no_partial_file(capsys, tmp_path, monkeypatch, data, script, flag):
    """The previous file at the path (if any) stays as it was; no temp file is left."""
    path = tmp_path / ("out.pth" if flag == "--save-features" else "out.json")
    if flag == "--save-features":
        monkeypatch.setattr(torch, "save", _full_disk_torch_save)
    else:
        path.write_text('{"previous": "run"}')
        monkeypatch.setattr(json, "dump", _full_disk_json_dump)
    if script == "eval_knn":
        argv = ["--checkpoint", data / "ck.pth", "--data", data / "imgs", *TINY, "--k", "1", flag, path]
    else:
        argv = ["--features", features_file(data / "feats.pth"), "--cluster", "--kmeans-runs", "1", flag, path]
    line = run_case(capsys, tmp_path, eval_knn if script == "eval_knn" else eval_frozen, argv,
                    f"{flag} {path}", "No space left on device", f"free space or pass another {flag}")
    assert ("previous" in line) == path.exists()


def test_eval_linear_and_frozen_copied_without_eval_knn_name_it(tmp_path, data):
    """Copied with common.py alone, --help works and a run says in one line that eval_knn.py is needed (its encoder
    loading and feature extraction); with eval_knn.py beside them both run."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in ("eval_linear.py", "eval_frozen.py", "common.py"):
        shutil.copy(ROOT / f, folder / f)
    base = ["--checkpoint", data / "ck.pth", "--data", data / "imgs", *TINY]
    runs = {"eval_linear": (["--epochs", "1", "--batch-size", "4", "--lrs", "0.1"], "best linear probe"),
            "eval_frozen": (["--cluster", "--kmeans-runs", "1"], "k-means (k=4")}
    for script, (extra, _) in runs.items():
        p = run_copy(folder, script, "--help")
        assert p.returncode == 0 and "--checkpoint" in p.stdout, p.stderr[-3000:]
        one_error_line(run_copy(folder, script, *base, *extra), f"{script}.py needs eval_knn.py")
    shutil.copy(ROOT / "eval_knn.py", folder / "eval_knn.py")
    for script, (extra, said) in runs.items():
        assert run_copy(folder, script, "--help").returncode == 0
        p = run_copy(folder, script, *base, *extra)
        assert p.returncode == 0 and said in p.stdout, p.stderr[-3000:]
