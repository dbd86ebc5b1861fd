"""One writer of a report folder at a time: a second `evaluate --out` into it is refused."""

import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import LockError
from npos.evaluate import check_report_dir, evaluate, write_report
from npos.store import lock_path


def test_second_writer_of_a_report_is_refused_naming_the_holder(world, lock_holder):
    out = world["tmp"] / "reports" / "run1"
    holder = lock_holder(out, "report folder")
    result = CliRunner().invoke(cli, ["evaluate", "--id", world["test"], "--ood",
                                      f"far={world['far']}", "--scores", "mcm", "--device",
                                      "cpu", "--out", str(out)])
    lock_holder.refused(result, holder, "report folder", out)
    res = evaluate(world["test"], {"far": world["far"]}, scores="mcm", device="cpu")
    with pytest.raises(LockError, match=f"pid {holder.pid}"):
        write_report(res, out)
    assert not out.exists()


def test_report_lock_is_held_from_the_check_to_the_write(world):
    out = world["tmp"] / "report"
    check_report_dir(out, overwrite=False)
    assert lock_path(out).exists()  # claimed while evaluating
    res = evaluate(world["test"], {"far": world["far"]}, scores="mcm", device="cpu")
    write_report(res, out)
    assert (out / "metrics.json").exists() and not lock_path(out).exists()
    with pytest.raises(Exception, match="already exists"):
        check_report_dir(out, overwrite=False)
    assert not lock_path(out).exists()  # a refused check releases the claim
