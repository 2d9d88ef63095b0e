"""Argument checks shared by BlockMask and the pattern builders.

Every check raises ValueError or TypeError with the argument's name, what was given and what is
required, so that callers can pass user input straight through.
"""

import numbers
import operator

import numpy


def as_int(name, value):
    """``value`` as a Python int; TypeError for bools, floats and other non-integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def positive_int(name, value):
    value = as_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def nonnegative_int(name, value):
    value = as_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def _items(value):
    """A tuple, a list or a 1-D NumPy array (``x.shape``'s parts as an array) as a list, else
    None."""
    if isinstance(value, numpy.ndarray) and value.ndim == 1:
        return list(value)
    return list(value) if isinstance(value, (tuple, list)) else None


def _pair(name, value, check):
    items = _items(value)
    if items is not None:
        if len(items) != 2:
            raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
        return check(f"{name}[0]", items[0]), check(f"{name}[1]", items[1])
    value = check(name, value)
    return value, value


def positive_pair(name, value):
    """An int ``b`` or a pair ``(b0, b1)`` of positive ints, returned as a pair."""
    return _pair(name, value, positive_int)


def nonnegative_pair(name, value):
    """An int ``w`` or a pair ``(w0, w1)`` of non-negative ints, returned as a pair."""
    return _pair(name, value, nonnegative_int)


def problem_shape(name, value):
    """An ``(Nq, Nk)`` pair of positive ints."""
    items = _items(value)
    if items is None or len(items) != 2:
        raise ValueError(f"{name} must be a pair (Nq, Nk) of positive integers, got {value!r}")
    return positive_int(f"{name}[0]", items[0]), positive_int(f"{name}[1]", items[1])


def tile_pair(name, value):
    """``(tile_m, tile_n)`` from a pair: a tuple, a list or a 1-D NumPy array of two items (each
    checked where it is used, under the name ``tile_m`` or ``tile_n``)."""
    items = _items(value)
    if items is None or len(items) != 2:
        raise ValueError(f"{name} must be a pair (tile_m, tile_n) of positive integers, "
                         f"got {value!r}")
    return items[0], items[1]


def picture_size(max_rows, max_cols):
    """The ``(max_rows, max_cols)`` of a mask's text picture, positive ints."""
    return positive_int("max_rows", max_rows), positive_int("max_cols", max_cols)


def ceil_div(a, b):
    return -(-a // b)
