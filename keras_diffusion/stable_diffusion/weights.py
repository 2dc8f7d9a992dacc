"""Checkpoint weights in the reference layout <-> the variables of a Keras part.

Every layer of the Stable Diffusion parts that owns weights knows its module
path in the reference state dict (`"down_blocks.0.resnets.0.conv1"`, in a
`module_path` attribute; its Keras name is that path with `_` for `.`, as
PyTorch refuses dots in the names Keras registers variables by), so the
table from a checkpoint key to a Keras variable is derived from the layers:
each lists its weights in a `checkpoint_weights()` method returning
`(variable, key, layout)` triples, by `RULES` for the Keras layer classes
(`vae.py` holds the shared helpers); a layer without that method is named
by its module path itself and follows `RULES`.

Layouts (reference -> Keras):

- `"same"`: unchanged (biases, norms, embeddings);
- `"dense"`: a `Linear` weight `(out, in)` -> a `Dense` kernel `(in, out)`;
- `"conv"`: a `Conv2d` weight `(out, in, kh, kw)` -> `(kh, kw, in, out)`;
- `"conv_as_dense"`: a 1x1 `Conv2d` weight `(out, in, 1, 1)` -> a `Dense`
  kernel `(in, out)` (the original VAE's attention, as diffusers reads it).
"""

import contextlib
import contextvars
import functools
import mmap
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np
from keras import layers

from keras_diffusion import backend
from keras_diffusion.checkpoint_files import is_private_map

LAYOUTS = ("same", "dense", "conv", "conv_as_dense")

# Keras layer class -> (variable attribute, reference key suffix, layout).
RULES = (
    (layers.Conv2D, (("kernel", "weight", "conv"), ("bias", "bias", "same"))),
    (layers.Dense, (("kernel", "weight", "dense"), ("bias", "bias", "same"))),
    (layers.GroupNormalization, (("gamma", "weight", "same"), ("beta", "bias", "same"))),
    (layers.LayerNormalization, (("gamma", "weight", "same"), ("beta", "bias", "same"))),
    (layers.Embedding, (("embeddings", "weight", "same"),)),
    (layers.RMSNormalization, (("scale", "weight", "same"),)),
)


def numpy_dtype(dtype):
    """The NumPy dtype of a Keras dtype name; bfloat16 is `ml_dtypes`' (a
    Keras dependency), which NumPy does not know by name."""
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def to_keras(value, layout):
    """A reference-layout array as the Keras variable holds it."""
    if layout == "dense":
        return value.T
    if layout == "conv":
        return value.transpose(2, 3, 1, 0)
    if layout == "conv_as_dense":
        return value.reshape(value.shape[0], value.shape[1]).T
    return value


# Output channels per band of `_banded_transpose`: a band of a Linear
# weight (64 rows) or of a 3x3 convolution (32 filters) of SD's widths and
# its transpose stay in a core's L2 cache.
_DENSE_BAND, _CONV_BAND = 64, 32
# New arrays start on a 64-byte boundary: XLA:CPU then takes them as they
# are (`backend.initial_value`), where it copies a NumPy array on NumPy's
# 16-byte one.
_ALIGN = 64
# A copy of at least this many bytes is split over the cores, and its
# array is memory of its own, mapped with its pages already in place.
_SPLIT_BYTES = 4 << 20


def _empty(shape, dtype):
    """`np.empty(shape, dtype)` starting on a `_ALIGN`-byte boundary.

    A large array gets a mapping of its own whose pages the kernel puts in
    place as it maps them (Linux' `MAP_POPULATE`): most of a load's time
    was the first write to each new page, one fault per page. On a Xeon VM
    new memory came 4.3-4.8 GB/s populated against 2.1-2.3 by first writes,
    huge pages included; a populated page then takes a copy at 10-12."""
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size >= _SPLIT_BYTES:
        return np.frombuffer(_mapping(size), np.uint8, size).view(dtype).reshape(shape)
    buffer = np.empty(size + _ALIGN, np.uint8)
    skip = -buffer.ctypes.data % _ALIGN
    return buffer[skip:skip + size].view(dtype).reshape(shape)


def _mapping(size):
    """`size` bytes of new memory, page-aligned, populated where the
    system can."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


@functools.cache
def _cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


@functools.cache
def _helpers():
    """Threads that copy beside the caller's, one per other core."""
    return ThreadPoolExecutor(_cores() - 1, thread_name_prefix="weights")


def _split(copy, count, nbytes):
    """Run `copy(start, stop)` over `range(count)`, in one contiguous part
    per core when the copy is large: the caller's thread takes the first,
    helper threads the others (NumPy releases the GIL in its copy loops,
    so the parts run side by side)."""
    parts = min(_cores(), count, max(1, nbytes // _SPLIT_BYTES))
    if parts <= 1 or getattr(_THREAD, "ahead", False):  # `_Ahead`'s thread copies alone
        copy(0, count)
        return
    bounds = [count * part // parts for part in range(parts + 1)]
    others = [_helpers().submit(copy, a, b) for a, b in zip(bounds[1:], bounds[2:])]
    copy(0, bounds[1])
    for done in others:
        done.result()


def _banded_transpose(value, axes, dtype, over, band):
    """`value.transpose(axes)` as a new C-contiguous array of `dtype`,
    copied `band` indices of the result's axis `over` at a time. NumPy's
    one-call copy of a large transpose misses the cache on nearly every
    element: on a Xeon core it moves 0.5 GB/s for SD's Linear weights and
    0.6 for its 3x3 kernels, the banded copy 3-4 and 1.5. Loading a
    checkpoint spends most of its time in these copies; a large one is
    split over the cores."""
    out = _empty(tuple(value.shape[axis] for axis in axes), dtype)

    def copy(first, last):
        source, target = [slice(None)] * value.ndim, [slice(None)] * value.ndim
        for start in range(first * band, min(last * band, out.shape[over]), band):
            source[axes[over]] = target[over] = slice(start, start + band)
            out[tuple(target)] = value[tuple(source)].transpose(axes)

    _split(copy, -(-out.shape[over] // band), out.nbytes)
    return out


def _conv_to_keras(value, dtype):
    """A `(out, in, kh, kw)` convolution kernel as a new C-contiguous
    `(kh, kw, in, out)` array of `dtype`, `_CONV_BAND` filters at a time,
    each band in two straight steps: its `(out, in * taps)` matrix
    transposed, then the taps moved ahead of the input channels. On a
    2-core Xeon that moved SD's kernels at 1.73-1.77 GB/s, one transposing
    copy of the band (`_banded_transpose`) at 1.51-1.54."""
    filters, inputs, height, width = value.shape
    out = _empty((height, width, inputs, filters), dtype)
    taps_first = out.reshape(height * width, inputs, filters)

    def copy(first, last):
        for start in range(first * _CONV_BAND, min(last * _CONV_BAND, filters), _CONV_BAND):
            stop = min(start + _CONV_BAND, filters)
            band = np.ascontiguousarray(value[start:stop].reshape(stop - start, -1).T)
            taps_first[:, :, start:stop] = band.reshape(inputs, height * width, -1).transpose(1, 0, 2)

    _split(copy, -(-filters // _CONV_BAND), out.nbytes)
    return out


def _fresh_copy(value, dtype):
    """`value` (any strides) as a new C-contiguous array of `dtype`, never
    `value` itself (which may be a view of a file), copied in parts along
    its first axis."""
    out = _empty(value.shape, dtype)
    if out.size and out.ndim:
        def copy(first, last):
            out[first:last] = value[first:last]

        _split(copy, len(out), out.nbytes)
    elif out.size:
        out[()] = value
    return out


def _own_map(value):
    """Whether `value` is a view of a memory map made for it alone (a lazily
    read file's tensor, `SafetensorsFiles(mapped=True)`), which no other
    array shares."""
    while isinstance(value, np.ndarray):
        value = value.base
    return is_private_map(value)


def keras_array(value, layout, dtype="float32"):
    """`to_keras(value, layout)` as a new C-contiguous array of `dtype`
    (what a variable is built from or assigned), made by banded copies."""
    value, dtype = np.asarray(value), np.dtype(dtype)
    if layout in ("dense", "conv_as_dense"):
        matrix = value.reshape(value.shape[0], value.shape[1])
        return _banded_transpose(matrix, (1, 0), dtype, over=1, band=_DENSE_BAND)
    if layout == "conv" and value.ndim == 4:
        return _conv_to_keras(value, dtype)
    return _fresh_copy(to_keras(value, layout), dtype)


def keras_view(value, layout, dtype="float32"):
    """`to_keras(value, layout)` of `dtype` for a backend whose variables
    may be strided views of host memory (PyTorch's): the reference layout's
    own memory seen through Keras' axes, no transposing copy. A tensor of
    `dtype` mapped from a file for itself alone is taken as it is (its map
    is private: a variable written later copies only the pages it writes);
    another is copied in its own layout (a straight copy, several times as
    fast as a transposing one). A 3x3 convolution is copied filter by
    filter to `(out, kh, kw, in)`, viewed as `(kh, kw, in, out)`: PyTorch's
    channels-last layout, which the backend's convolution would otherwise
    lay the kernel out in on its first call (`backend/torch.py`)."""
    value, dtype = np.asarray(value), np.dtype(dtype)
    if layout == "conv" and value.ndim == 4:
        return _fresh_copy(value.transpose(0, 2, 3, 1), dtype).transpose(1, 2, 3, 0)
    if layout == "conv_as_dense":
        value, layout = value.reshape(value.shape[0], value.shape[1]), "dense"
    if not (value.dtype == dtype and value.flags.writeable and _own_map(value)):
        value = _fresh_copy(value, dtype)
    return to_keras(value, layout)


def reference_array(value, layout, dtype="float32"):
    """`to_reference(value, layout)` as a new C-contiguous array of `dtype`:
    `keras_array` undone, by the same banded copies."""
    value, dtype = np.asarray(value), np.dtype(dtype)
    if layout in ("dense", "conv_as_dense"):
        matrix = _banded_transpose(value, (1, 0), dtype, over=1, band=_DENSE_BAND)
        return matrix if layout == "dense" else matrix[:, :, None, None]
    if layout == "conv" and value.ndim == 4:
        return _banded_transpose(value, (3, 2, 0, 1), dtype, over=0, band=_CONV_BAND)
    return _fresh_copy(to_reference(value, layout), dtype)


def to_reference(value, layout):
    """A Keras variable's array in the reference layout (`to_keras` undone)."""
    if layout == "dense":
        return value.T
    if layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if layout == "conv_as_dense":
        return value.T[:, :, None, None]
    return value


def keras_shape(shape, layout):
    """The shape `to_keras` gives an array of `shape` (read from a file's
    header, no data needed)."""
    shape = tuple(int(d) for d in shape)
    if layout == "dense":
        return shape[::-1]
    if layout == "conv":
        return tuple(shape[i] for i in (2, 3, 1, 0)) if len(shape) == 4 else shape
    if layout == "conv_as_dense":
        return shape[1::-1]
    return shape


class Renamed(Mapping):
    """A read-only view of `state_dict` under other keys (`{new: old}`),
    reading no value until asked: how a lazily read file is renamed."""

    def __init__(self, state_dict, names):
        self._state, self._names = state_dict, dict(names)

    def __getitem__(self, key):
        return self._state[self._names[key]]

    def __contains__(self, key):  # Mapping's own would read the value
        return key in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def shape(self, key):
        return _shape(self._state, self._names[key])


# ------------------------------------------------- building from a checkpoint
# While a part is built inside `building_from(state_dict)`, each weight the
# layers create takes its checkpoint value at once (`from_checkpoint`): no
# placeholder of 860M values is made and then overwritten, and a lazily
# read file holds one tensor in memory at a time.
_BUILDING = contextvars.ContextVar("keras_diffusion_sd_building", default=None)


@contextlib.contextmanager
def building_from(state_dict, dtype=None):
    """Within it, the Stable Diffusion layers created take their weights
    from the reference-layout `state_dict` as they build them. Yields the
    set of keys so taken; `load_state_dict(..., taken=)` then checks the
    keys and assigns what is left (weights of other layers, values whose
    shape did not fit, which it names).

    With `dtype` (the variables' dtype) and more than one core, the large
    weights are put in Keras' layout ahead, on another thread, while this
    one builds the layers (`_Ahead`)."""
    taken = set()
    ahead = None
    if dtype is not None and _cores() > 1 and keras.distribution.distribution() is None:
        ahead = _Ahead(state_dict, numpy_dtype(dtype))
    token = _BUILDING.set((state_dict, taken, ahead))
    try:
        yield taken
    finally:
        _BUILDING.reset(token)
        if ahead is not None:
            ahead.close()


_THREAD = threading.local()
# `_Ahead` makes the weights of at least this many bytes.
_AHEAD_BYTES = 1 << 20


def _layout_maker():
    """How a new variable's value is made from a checkpoint's: a view
    where the backend's variables may be strided (`keras_view`), else a
    dense copy (`keras_array`)."""
    return keras_view if backend.strided_variables() else keras_array


def _foreseen_layout(key, shape):
    """The layout a weight most likely takes, from its key and shape
    alone: a kernel of several taps is a convolution's, a 2-D `.weight` not
    of an embedding a `Linear`'s; None where that is not clear."""
    if len(shape) == 4 and shape[2] * shape[3] > 1:
        return "conv"
    if (len(shape) == 2 and key.endswith(".weight")
            and not any(word in key for word in ("embed", "shared", "relative_attention"))):
        return "dense"
    return None


class _Ahead:
    """The large weights of a state dict in Keras' layout, made on a
    thread of their own, in the file's order, while the caller's thread
    builds the layers: building is Python work that holds one core, and on
    the others the layout copies (most of a load's time) run beside it.
    Each weight is made once, by whichever thread comes to it first; the
    caller's thread waits only for one being made. The layout is foreseen
    from the key (`_foreseen_layout`): a weight whose layer asks for
    another layout or dtype is made again as asked."""

    def __init__(self, state_dict, dtype):
        self._state, self._dtype = state_dict, dtype
        self._make = _layout_maker()
        self._lock = threading.Lock()
        self._claimed = {}  # key -> Future of (array, layout); None once taken
        self._closed = False
        plan = []
        for key in state_dict:
            shape = _shape(state_dict, key)
            layout = _foreseen_layout(key, shape)
            if layout and int(np.prod(shape, dtype=np.int64)) * dtype.itemsize >= _AHEAD_BYTES:
                plan.append((key, layout))
        self._thread = threading.Thread(target=self._run, args=(plan,), daemon=True,
                                        name="keras_diffusion-weights-ahead")
        self._thread.start()

    def _run(self, plan):
        _THREAD.ahead = True
        for key, layout in plan:
            with self._lock:
                if self._closed:
                    return
                if key in self._claimed:
                    continue
                future = self._claimed[key] = Future()
            try:
                future.set_result((self._make(self._state[key], layout, self._dtype), layout))
            except BaseException as error:  # the caller's thread makes it again, and raises
                future.set_exception(error)

    def take(self, key, layout, dtype):
        """The weight at `key` in `layout` and `dtype`: the one made ahead,
        else made now."""
        with self._lock:
            future = self._claimed.get(key)
            self._claimed[key] = None
        if future is not None and future.exception() is None:
            value, made_layout = future.result()
            if made_layout == layout and value.dtype == dtype:
                return value
        return self._make(self._state[key], layout, dtype)

    def close(self):
        """Stop making weights (the one being made is finished) and drop
        those not taken."""
        with self._lock:
            self._closed = True
        self._thread.join()
        self._claimed.clear()


def from_checkpoint(key, layout, initializer):
    """The initializer for the weight at `key`: inside `building_from`, one
    returning the checkpoint's value (when it has the key, at the right
    shape); otherwise `initializer`."""
    building = _BUILDING.get()
    if building is None or key not in building[0]:
        return initializer
    if keras.distribution.distribution() is not None:
        # Sharded weights start as zeros made on their devices (JAX compiles a
        # large one's initializer for its layout); `load_state_dict` then
        # assigns each value, which Keras puts on the devices as its layout says.
        return keras.initializers.Zeros()
    state_dict, taken, ahead = building
    fallback = keras.initializers.get(initializer)

    def initialize(shape, dtype=None):
        if keras_shape(_shape(state_dict, key), layout) != tuple(int(d) for d in shape):
            return fallback(shape, dtype)  # load_state_dict names the mismatch
        taken.add(key)
        dtype = numpy_dtype(dtype or "float32")
        if ahead is not None:
            return backend.initial_value(ahead.take(key, layout, dtype))
        return backend.initial_value(_layout_maker()(state_dict[key], layout, dtype))

    return initialize


def _layer_weights(layer):
    own = getattr(layer, "checkpoint_weights", None)
    if own is not None:
        return list(own())
    for cls, rules in RULES:
        if isinstance(layer, cls):
            return [(getattr(layer, attribute), f"{layer.name}.{suffix}", layout)
                    for attribute, suffix, layout in rules
                    if getattr(layer, attribute, None) is not None]
    return []


def checkpoint_table(model):
    """`{reference key: (variable, layout)}` for every weight of `model`."""
    table = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable, key, layout in _layer_weights(layer):
            if key in table:
                raise ValueError(f"two variables of {model.name} claim the checkpoint key {key!r}.")
            table[key] = (variable, layout)
    return table


def _listed(keys, limit=5):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(table, state_dict, what):
    """Raise one `ValueError` naming the first missing and unexpected keys
    when `state_dict` does not hold exactly the weights of `table`."""
    missing = set(table) - set(state_dict)
    unexpected = set(state_dict) - set(table)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
        raise ValueError(f"the {what} weights do not match its architecture: "
                         f"{'; '.join(parts)}.")


def load_state_dict(model, state_dict, what="model", taken=()):
    """Assign a reference-layout `state_dict` (`{key: numpy array}`, or any
    mapping: a lazily read file's) to `model`'s variables, cast to each
    variable's dtype; the keys in `taken` (weights the model was built with,
    `building_from`) are checked but not assigned again.

    Every key must match a variable and every variable a key, with the
    right shape; otherwise one `ValueError` names what differs and nothing
    is assigned."""
    table = checkpoint_table(model)
    check_keys(table, state_dict, what)
    left = {key: entry for key, entry in table.items() if key not in taken}
    for key, (variable, layout) in left.items():
        shape = _shape(state_dict, key)
        if keras_shape(shape, layout) != tuple(variable.shape):
            raise ValueError(
                f"the {what} weight {key!r} has shape {shape}, "
                f"which does not fit the architecture (Keras variable {variable.path} of shape "
                f"{tuple(variable.shape)}); is the checkpoint for another configuration?"
            )
    for key, (variable, layout) in left.items():
        variable.assign(keras_array(state_dict[key], layout, numpy_dtype(variable.dtype)))


def _shape(state_dict, key):
    """A value's shape, from a lazily read file's header where it has one."""
    shape_of = getattr(state_dict, "shape", None)
    return tuple(shape_of(key)) if shape_of is not None else tuple(np.shape(state_dict[key]))


def state_dict(model):
    """`model`'s weights as a reference-layout `{key: float32 numpy array}`,
    LoRA layers merged: their `kernel` is Keras' sum of the base kernel and
    the LoRA product."""
    return {key: reference_array(keras.ops.convert_to_numpy(value), layout)
            for key, (value, layout) in checkpoint_table(model).items()}


@keras.saving.register_keras_serializable(package="keras_diffusion", name="Placeholder")
class Placeholder(keras.initializers.Initializer):
    """A Keras initializer for weights that a checkpoint overwrites: zeros
    made by NumPy on the host, so building an 860M-parameter UNet neither
    draws random numbers nor (under JAX) compiles a kernel per shape."""

    def __call__(self, shape, dtype=None):
        return np.zeros(tuple(int(d) for d in shape), dtype=dtype or "float32")

    def get_config(self):
        return {}
