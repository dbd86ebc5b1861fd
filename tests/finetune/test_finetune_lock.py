"""One writer of a fine-tuning output folder at a time."""

import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import LockError
from npos.finetune import finetune


def test_second_writer_of_a_finetune_folder_is_refused(token_stores, head_config, tmp_path,
                                                       lock_holder):
    out = tmp_path / "ft"
    holder = lock_holder(out, "fine-tuning output folder")
    result = CliRunner().invoke(cli, ["finetune", token_stores["train"], "--out", str(out),
                                      "--model", "npos-tiny", "--pretrained", "none",
                                      "--epochs", "1", "--device", "cpu"])
    lock_holder.refused(result, holder, "fine-tuning output folder", out)
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        finetune(token_stores["train"], str(out), model="npos-tiny", pretrained="none",
                 head_config=head_config(epochs=1), device="cpu")
