"""Checkpoint files read into NumPy: `.safetensors` files (read by this
module, no torch needed) and PyTorch pickles (through torch's weights-only
loader). The readers know nothing of any model: every checkpoint family, the
diffusers folders and the LoRA files read their tensors here.
"""

import ctypes
import functools
import mmap
import os
import weakref
from collections.abc import Mapping

import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_weights(path, *, upcast_bfloat16=True):
    """`{key: numpy array}` of any checkpoint file: a `.safetensors` file
    (`read_safetensors`), or a PyTorch pickle (`.ckpt`, `.bin`, `.pt`,
    `.pth`, or one under another name, known by its first bytes).

    A pickle is read with torch's weights-only unpickler
    (`torch.load(..., weights_only=True)`, which builds only tensors and
    plain containers and runs no code from the file) when torch is
    importable; without torch it cannot be read safely, and one
    `ValueError` says to convert it to `.safetensors`. Weights nested under
    `state_dict` (Lightning checkpoints) are taken from there; entries that
    are not tensors (`global_step`, ...) are left out."""
    path = _checkpoint_path(path)
    if path.lower().endswith(PICKLE_SUFFIXES) or _looks_pickled(path):
        return _read_pickle(path, upcast_bfloat16)
    return read_safetensors(path, upcast_bfloat16=upcast_bfloat16)


def read_safetensors(path, *, upcast_bfloat16=True, lazy=False):
    """`{key: numpy array}` of a `.safetensors` file (or of the shards of
    one, given a list of paths), no torch needed. With `lazy=True` a
    read-only mapping that reads each tensor from the file only when asked
    (and gives shapes from the header, `shape(key)`), so loading holds one
    tensor at a time: each value is then a view of its bytes in the file (a
    private memory map of that tensor alone, unmapped when the value is
    freed; writing to it copies the pages written, never the file), valid
    while the file is not rewritten in place (replacing it is safe).

    NumPy has no bfloat16 of its own: `ml_dtypes` (a Keras dependency)
    gives it one, and `upcast_bfloat16` (the default) turns those tensors
    into float32, which holds every bfloat16 value exactly; with
    `upcast_bfloat16=False` they stay `ml_dtypes.bfloat16`. Other dtypes
    are kept. A truncated or corrupt file raises one `ValueError` naming
    it."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    state = SafetensorsFiles([_checkpoint_path(p) for p in paths], upcast_bfloat16, mapped=lazy)
    return state if lazy else dict(state)


# safetensors' dtype names -> NumPy's (bfloat16 through ml_dtypes).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                       "BOOL": "bool"}


class SafetensorsFiles(Mapping):
    """The tensors of `.safetensors` files as a read-only mapping, each read
    from its file when asked for (see `read_safetensors`).

    The format is an 8-byte little-endian header length, a JSON header
    (`{key: {"dtype", "shape", "data_offsets": [begin, end]}}`, offsets from
    the end of the header) and the data. Each tensor is read with one plain
    read into its own array or, `mapped`, as a view of a memory map of its
    bytes alone. Never the whole file through one map: a mapped file's
    pages count in the process's resident memory for as long as it stays
    mapped, which doubled the peak of loading SD 1.5 (4.3 GB of file pages
    beside 4.3 GB of weights). A tensor's own map is gone with its value,
    and a load that copies each value into a variable reads the file once,
    where a read into new memory and the copy would write every byte
    twice; a backend whose variables can be such a view (PyTorch's)
    keeps it, and its pages are the weights."""

    def __init__(self, paths, upcast_bfloat16=True, mapped=False):
        import ml_dtypes

        self._bfloat16 = np.dtype(ml_dtypes.bfloat16)
        self.upcast_bfloat16, self.mapped = upcast_bfloat16, mapped
        self._files = {}
        for path in paths:
            for key, entry in self._header(path).items():
                self._files[key] = (path, entry)

    @staticmethod
    def _header(path):
        """`{key: (dtype, shape, begin, end)}`, the offsets from the file's start."""
        import json
        import struct

        def fail(reason):
            if _looks_pickled(path):
                return ValueError(f"{path} is a PyTorch pickle, not a .safetensors file.")
            return ValueError(f"{path} is not a readable .safetensors file (truncated or "
                              f"corrupt?): {reason}.")

        size = os.path.getsize(path)
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise fail(f"{size} bytes, shorter than a header")
            length = struct.unpack("<Q", prefix)[0]
            if length > size - 8:
                raise fail(f"a header of {length} bytes in a file of {size}")
            try:
                header = json.loads(file.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise fail(f"its header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise fail("its header is not a JSON object")
        header.pop("__metadata__", None)
        entries = {}
        for key, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = (8 + length + int(offset) for offset in info["data_offsets"])
                shape = tuple(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise fail(f"tensor {key!r} is described as {info!r}") from None
            if end > size or begin > end:
                raise fail(f"tensor {key!r} ends at byte {end} of {size}")
            entries[key] = (dtype, shape, begin, end)
        return entries

    def _read(self, key):
        path, (dtype, shape, begin, end) = self._files[key]
        dtype = self._bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if (end - begin) != count * dtype.itemsize:
            raise ValueError(f"{path} is not a readable .safetensors file (truncated or "
                             f"corrupt?): tensor {key!r} has {end - begin} bytes for shape "
                             f"{shape}.")
        if self.mapped and count:
            start = begin - begin % mmap.ALLOCATIONGRANULARITY
            view = private_map(path, start, end - start)
            value = np.frombuffer(view, dtype.newbyteorder("<"), count, begin - start)
        else:
            value = np.fromfile(path, dtype=dtype.newbyteorder("<"), count=count, offset=begin)
        return value.astype(dtype, copy=False).reshape(shape)

    def __getitem__(self, key):
        value = self._read(key)
        return _upcast(value) if self.upcast_bfloat16 else value

    def __contains__(self, key):  # Mapping's own would read the tensor
        return key in self._files

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)

    def shape(self, key):
        return self._files[key][1][1]


def private_map(path, offset, length):
    """`length` bytes of the file at `path` from `offset` (a multiple of
    `mmap.ALLOCATIONGRANULARITY`) as a private, writable memory map (a
    write copies the page written, never the file), unmapped when nothing
    refers to it any more.

    Where the C library's `mmap` is at hand (Linux, macOS) the map holds no
    file descriptor: Python's `mmap.mmap` keeps a duplicate of one per map
    (before 3.13's `trackfd=False`), and a model whose weights stay views
    of their maps (PyTorch's, `weights.keras_view`) held one per tensor,
    past the common limit of 1,024 open files with SDXL's 2,600."""
    with open(path, "rb") as file:
        libc = _libc()
        if libc is None:
            return _FileMap(file.fileno(), length, access=mmap.ACCESS_COPY, offset=offset)
        address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE,
                            file.fileno(), offset)
    if address is None or address == ctypes.c_void_p(-1).value:  # MAP_FAILED
        error = ctypes.get_errno()
        raise OSError(error, f"cannot map {length} bytes of {path}: {os.strerror(error)}")
    pages = (ctypes.c_char * length).from_address(address)
    pages.private_map = True
    # Not at exit: code running then (an atexit hook saving a model) may
    # still read the weights; the process's end unmaps them anyway.
    weakref.finalize(pages, libc.munmap, address, length).atexit = False
    return pages


def is_private_map(buffer):
    """Whether `buffer`, the object under an array's views, is a map made
    by `private_map` (each tensor of a lazily read file has its own)."""
    if isinstance(buffer, memoryview):
        buffer = buffer.obj
    return getattr(buffer, "private_map", False) is True


class _FileMap(mmap.mmap):
    """Python's map of a file, marked as `private_map`'s (an anonymous map
    of new memory is not one)."""

    private_map = True


@functools.cache
def _libc():
    """The C library's `mmap` and `munmap` through ctypes, or None."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _checkpoint_path(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}.")
    return path


def _looks_pickled(path):
    """Whether a file is a PyTorch pickle: a zip archive (torch >= 1.6) or a
    bare pickle, and not a safetensors file (an 8-byte header length, then
    its JSON, whose first byte could pass for a pickle's)."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def _upcast(value):
    import ml_dtypes

    return value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value


def _read_pickle(path, upcast_bfloat16):
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is a PyTorch pickle, which cannot be loaded without executing code it "
            "contains; convert it to .safetensors, or install torch (>= 2.6), whose weights-only "
            "loader reads it without running any code."
        ) from None
    try:
        with open(path, "rb") as file:  # a file, not a name: torch dispatches on the suffix
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise ValueError(f"{path} could not be read by PyTorch's weights-only loader (a "
                         f"truncated file, or one that needs code to unpickle: "
                         f"{_reason(error)}); convert it to .safetensors.") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    return {key: _tensor_to_numpy(value, upcast_bfloat16) for key, value in state.items()
            if isinstance(key, str) and isinstance(value, torch.Tensor)}


def _reason(error):
    """The line of torch's many-line unpickling error that says what was
    refused (or its first line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (refused or lines or [type(error).__name__])[0]


def _tensor_to_numpy(tensor, upcast_bfloat16):
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        if upcast_bfloat16:
            return tensor.float().numpy()
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
