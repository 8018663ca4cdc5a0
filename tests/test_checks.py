"""qil_core/checks.py: the one home of number, int, choice and finite checks; messages name the input as shown."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qil_core.checks import check_choice, check_finite, check_int, check_number, describe_range
from qil_core.errors import InputError


def test_numbers_are_checked_with_the_name_the_caller_shows() -> None:
    assert check_number("--cfg", 4) == 4.0 and isinstance(check_number("x", np.float32(0.5)), float)
    with pytest.raises(InputError, match=r"^--cfg must be a finite number in 1\.\.100, got nan"):
        check_number("--cfg", math.nan, 1.0, 100.0)
    with pytest.raises(InputError, match=r"^input 'opacity' must be in 0\.\.1, got 2"):
        check_number("input 'opacity'", 2, 0, 1)
    with pytest.raises(InputError, match="must be a number"):
        check_number("x", True)  # a bool is not a number here
    with pytest.raises(InputError, match="must be a number"):
        check_number("x", "1.5")  # strict: no text
    assert check_number("x", "1.5", loose=True) == 1.5  # the layer engine's loose rule takes anything float() takes
    with pytest.raises(InputError, match=r"x must be >= 0, got -1"):
        check_number("x", -1, lo=0)
    with pytest.raises(InputError, match="x must be a finite number, got inf"):
        check_number("x", math.inf)


def test_integers_refuse_floats_unless_whole_floats_are_allowed() -> None:
    assert check_int("layers", np.int64(4), 1, 20) == 4
    with pytest.raises(InputError, match=r"layers must be an integer in 1\.\.20, got 2\.5 \(float\)"):
        check_int("layers", 2.5, 1, 20)
    with pytest.raises(InputError, match=r"layers must be in 1\.\.20, got 21; hint"):
        check_int("layers", 21, 1, 20, "; hint")
    with pytest.raises(InputError, match="must be an integer"):
        check_int("layers", True, 1, 20)
    assert check_int("input 'to_index'", 3.0, allow_float=True) == 3
    with pytest.raises(InputError, match="input 'to_index' must be a whole number, got 3.5"):
        check_int("input 'to_index'", 3.5, allow_float=True)
    with pytest.raises(InputError, match="whole number"):
        check_int("n", math.nan, allow_float=True)


def test_choices_compare_type_and_value_and_list_the_allowed_ones() -> None:
    assert check_choice("output_size", "original", ("processing", "original")) == "original"
    with pytest.raises(InputError, match="output_size must be 'processing' or 'original', got 'huge'"):
        check_choice("output_size", "huge", ("processing", "original"))
    with pytest.raises(InputError, match="--memory must be one of auto, resident, offload, block_swap, got 'x'"):
        check_choice("--memory", "x", ("auto", "resident", "offload", "block_swap"))
    with pytest.raises(InputError):
        check_choice("n", 1.0, (1, 2, 3))  # 1.0 is not the int choice 1


def test_finite_arrays_and_ranges_in_words() -> None:
    check_finite("embeds", torch.ones(2, 3))
    check_finite("empty", np.zeros((0, 3)))
    with pytest.raises(InputError, match="embeds contains NaN or inf"):
        check_finite("embeds", torch.tensor([1.0, math.inf]))
    with pytest.raises(InputError, match="pixels contains NaN"):
        check_finite("pixels", np.array([math.nan]))
    assert describe_range(1, 20) == "1..20" and describe_range(0.0, 1.0) == "0..1"
    assert describe_range(None, 5) == "<= 5" and describe_range(None, None) == ""
