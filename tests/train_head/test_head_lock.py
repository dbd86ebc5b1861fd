"""One writer of a head folder at a time: a second `train-head` into it is refused."""

import signal

import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import LockError
from npos.train_head import HeadConfig, load_head, train_head

ARGS = ["--epochs", "1", "--batch-size", "256", "--ood-weight", "0", "--device", "cpu"]


def test_second_writer_of_a_head_is_refused_naming_the_holder(world_stores, tmp_path,
                                                             lock_holder):
    out = tmp_path / "runs" / "head"
    holder = lock_holder(out, "head")
    result = CliRunner().invoke(cli, ["train-head", world_stores["train"], "--out", str(out),
                                      *ARGS])
    lock_holder.refused(result, holder, "head", out)
    assert not (tmp_path / "runs" / "head.partial").exists()
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        train_head(world_stores["train"], str(out), HeadConfig(epochs=1, ood_weight=0.0))

    holder.send_signal(signal.SIGKILL)  # killed: its lock is stale and taken over
    holder.wait()
    with pytest.warns(UserWarning, match="taking over the stale lock of head"):
        train_head(world_stores["train"], str(out), HeadConfig(epochs=1, ood_weight=0.0))
    assert load_head(out).config["epochs"] == 1
    assert not (tmp_path / "runs" / ".head.lock").exists()  # released when done
