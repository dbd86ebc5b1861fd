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
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert f"fine-tuning output folder {str(out)!r} is being written by another process " \
           f"(pid {holder.pid}" in lines[0] and "npos holder --test" in lines[0]
    assert not out.exists()
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        finetune(token_stores["train"], str(out), model="npos-tiny", pretrained="none",
                 head_config=head_config(epochs=1), device="cpu")
