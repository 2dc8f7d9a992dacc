"""Argument rules shared across the library, each written once.

Library functions raise `ValueError` with a message that names the argument,
what it accepts and what it got. This module imports nothing of Keras, so
any module may use it.
"""

import numpy as np


def is_integer(value):
    """An int or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value):
    """A real number (int, float or numpy scalar), not a bool."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def check_integer(name, value, *, low=1, allow_none=False, note=""):
    """`value` if it is an integer >= `low` (or None, when `allow_none`);
    otherwise raise, e.g. "steps must be a positive integer; got 0."."""
    if (value is None and allow_none) or (is_integer(value) and value >= low):
        return value
    expected = "a positive integer" if low == 1 else f"an integer >= {low}"
    if allow_none:
        expected += " or None"
    raise ValueError(f"{name} must be {expected}{note}; got {value!r}.")


def check_guidance(guidance_scale, conditional):
    """Classifier-free guidance (a scale other than 1) needs a conditional
    model (class labels or prompts); a scale below 0 means nothing."""
    if not conditional:
        if guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} needs a class-conditional model; "
                "this model is unconditional, so leave guidance_scale at 1.0."
            )
    elif guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale!r}.")
