"""A missing optional package is one line naming the extra that installs it (tensorboard, s3,
gcs, weights), and TensorBoard logging says when it is off instead of skipping silently."""

import sys
import types

import pytest

from mlc.cli import main
from mlc.config import ConfigError, load_config
from mlc.data.urls import url_shards
from mlc.extras import PROTOCOL_EXTRAS, MissingExtraError, require
from mlc.models.weights import read_keras_h5
from mlc.train.logs import MetricsLog, summary_writer_class

TENSORBOARD = "torch.utils.tensorboard"


def missing(monkeypatch, *modules):
    # fsspec keeps the file-system classes it has loaded (an earlier test's s3:// reads):
    # forget those of the missing packages too.
    loaded = getattr(sys.modules.get("fsspec.registry"), "_registry", {})
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
        for protocol, (package, _) in PROTOCOL_EXTRAS.items():
            if package == module:
                monkeypatch.delitem(loaded, protocol, raising=False)


def test_require_names_the_package_and_the_extra(monkeypatch):
    missing(monkeypatch, "h5py")
    with pytest.raises(MissingExtraError) as error:
        require("h5py", "reading Keras .h5 weights", "h5py", "weights")
    assert str(error.value) == (
        "reading Keras .h5 weights needs the h5py package: pip install 'mlc[weights]'"
    )
    assert isinstance(error.value.__cause__, ImportError)  # shown with MLC_DEBUG=1
    assert require("json", "x", "json", "x") is sys.modules["json"]


def test_tensorboard_auto_says_once_that_it_is_off_and_why(monkeypatch):
    missing(monkeypatch, TENSORBOARD)
    said = []
    assert summary_writer_class("auto", said.append) is None
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("note: TensorBoard logging is off for this run.")
    assert "pip install 'mlc[tensorboard]'" in said[0] and "train.tensorboard=false" in said[0]
    assert summary_writer_class(False, said.append) is None and len(said) == 1
    with pytest.raises(MissingExtraError, match=r"^train.tensorboard=true: TensorBoard logging "):
        summary_writer_class(True, said.append)


def test_tensorboard_is_used_when_installed(monkeypatch, tmp_path):
    written = []

    class Writer:
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, key, value, step):
            written.append((self.folder, key, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, TENSORBOARD, types.SimpleNamespace(SummaryWriter=Writer))
    said = []
    writer = summary_writer_class("auto", said.append)
    assert writer is Writer and said == []
    log = MetricsLog(tmp_path, writer=writer)
    log.write({"samples": 10, "loss": 0.5, "note": "x"})
    log.close()
    assert written == [(str(tmp_path / "tensorboard"), "train/loss", 0.5, 10)]


def test_mlc_train_with_tensorboard_true_and_no_package_is_one_line(monkeypatch, tmp_path, capsys):
    missing(monkeypatch, TENSORBOARD)
    args = ["train", "--set", "train.tensorboard=true", "--set", f"train.out={tmp_path / 'r'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        "mlc train: error: train.tensorboard=true: TensorBoard logging needs the tensorboard "
        "package: pip install 'mlc[tensorboard]'\n"
    )


def test_tensorboard_setting_is_checked():
    assert load_config(None, ["train.tensorboard=false"]).train.tensorboard is False
    assert load_config(None, []).train.tensorboard == "auto"
    with pytest.raises(ConfigError, match="train.tensorboard must be auto, true or false"):
        load_config(None, ["train.tensorboard=sometimes"])


@pytest.mark.parametrize(
    "url, package, extra",
    [("s3://bucket/a-000000.tar", "s3fs", "s3"), ("gs://bucket/a-000000.tar", "gcsfs", "gcs")],
)
def test_cloud_shards_without_their_package_are_one_line_naming_the_extra(
    monkeypatch, url, package, extra
):
    missing(monkeypatch, package)
    with pytest.raises(MissingExtraError) as error:
        url_shards([url], sizes={url: 10})
    protocol = url.split("://")[0]
    assert str(error.value) == (
        f"reading {protocol}:// shards ({url}) needs the {package} package: "
        f"pip install 'mlc[{extra}]'"
    )


def test_an_unknown_protocol_is_named_with_its_url():
    with pytest.raises(ValueError, match=r"^nosuch://b/a.tar: .*nosuch"):
        url_shards(["nosuch://b/a.tar"], sizes={"nosuch://b/a.tar": 1})


def test_keras_weights_without_h5py_name_the_weights_extra(monkeypatch, tmp_path):
    missing(monkeypatch, "h5py")
    with pytest.raises(MissingExtraError, match=r"pip install 'mlc\[weights\]'$"):
        read_keras_h5(tmp_path / "w.h5")
