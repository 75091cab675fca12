"""Host arrays that start on a 64-byte boundary, read from .npz files straight into such memory.

XLA's CPU client uses an aligned host array in place and copies any other: features in aligned memory are
held once on a CPU, however many jax devices read them, where each device had its own copy. Loading them
into aligned memory directly (rather than aligning a loaded copy) keeps the load's peak at their size.
"""

from __future__ import annotations

import numpy as np
from numpy.lib import format as npy

ALIGNMENT = 64  # bytes
_CHUNK = 1 << 20  # bytes read at a time from a .npz member: zipfile holds about twice a request in buffers


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array of `shape` whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(size + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start:start + size].view(dtype).reshape(shape)


def aligned(a: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """`a` as `dtype` (default its own) in aligned C-contiguous memory: `a` itself where it is so already, else
    one copy (a cast as numpy's assignment casts: float64 beyond float32's range becomes Inf)."""
    a = np.asarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.dtype == dtype and a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0:
        return a
    out = aligned_empty(a.shape, dtype)
    with np.errstate(over="ignore"):
        out[...] = a
    return out


def npz_array(z: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    """Array `name` of an open .npz as `z[name]` gives it, read into aligned memory where it is plain data in
    C order (`z[name]` itself for anything else: Fortran order, Python objects, a member that is not .npy)."""
    member = f"{name}.npy"
    if member not in z.zip.namelist():
        return z[name]
    with z.zip.open(member) as f:
        try:
            version = npy.read_magic(f)
        except ValueError:  # not .npy data: numpy's reader says what it is
            version = None
        if version not in ((1, 0), (2, 0)):
            return z[name]
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject:
            return z[name]
        out = aligned_empty(shape, dtype)
        into, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < out.nbytes:
            n = f.readinto(into[done:done + _CHUNK])
            if not n:
                raise EOFError(f"array {name} ends after {done} of its {out.nbytes} bytes")
            done += n
    return out
