import pytest

from npos.errors import ParameterError
from npos.validation import check_choice, check_float, check_int


def test_messages_follow_one_template():
    with pytest.raises(ParameterError, match=r"^The 'k' parameter of synthesize must be an int "
                       r"in the range \[1, 10\) \(k < bank\)\. Got 10 instead\.$"):
        check_int("k", 10, 1, 10, high_closed=False, why=" (k < bank)", owner="synthesize")
    with pytest.raises(ParameterError, match=r"^The 'lr' parameter must be a float in the range "
                       r"\(0, inf\)\. Got 0 instead\.$"):
        check_float("lr", 0, 0.0, low_open=True)
    with pytest.raises(ParameterError, match=r"must be one of 'a', 'b'\. Got 'c' instead\.$"):
        check_choice("x", "c", ("a", "b"))


@pytest.mark.parametrize("value", [True, 2.0, "3", -1, None])
def test_check_int_rejects(value):
    with pytest.raises(ParameterError):
        check_int("n", value, 0)


def test_accepted_values_and_none():
    check_int("n", 0, 0)
    check_int("n", None, 1, allow_none=True)
    check_float("p", 1.0, 0.0, 1.0, low_open=True)
    check_float("s", None, 0.0, allow_none=True)
    with pytest.raises(ParameterError, match=r"\[0, 1\] or None"):
        check_float("p", float("nan"), 0.0, 1.0, allow_none=True)
