"""Triton plumbing shared by the op files: optional import, launch checks, tile maps.

Triton is optional (the torch path needs nothing else), so the kernels are decorated with
``jit``, which is ``triton.jit`` when Triton imports and the identity otherwise; the
dispatchers never route to a kernel when Triton is missing (``backends.resolve``).
"""
from __future__ import annotations

import functools

import torch
from packaging.version import Version

from ..backends import triton_interpreting

try:
    import triton
    import triton.language as tl
except Exception:  # triton is an optional dependency and raises assorted errors without a driver
    triton = None
    tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)

# dtypes the Triton paths read; float64 inputs go to torch (its reference is float64-exact)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtypes the Triton paths accumulate into directly; any other ``out`` gets a float32 buffer
OUT_DTYPES = (torch.float32, torch.float64)


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """True when a kernel must widen ``dtype`` operands to float32 before ``tl.dot``.

    Triton's interpreter (3.x) stores bfloat16 as raw uint16 and its ``tl.dot`` multiplies
    those bit patterns, so under ``TRITON_INTERPRET=1`` bfloat16 tiles are widened first
    (exact: float32 holds every bfloat16 value). Compiled kernels keep bfloat16 tensor cores.
    """
    return dtype == torch.bfloat16 and triton_interpreting()


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: exact float32 products ("ieee") unless TF32 is allowed;
    16-bit operands multiply exactly on tensor cores whatever it says."""
    return "ieee" if (dtype == torch.float32 and not allow_tf32) else "tf32"


def check_launchable(kernel, op: str) -> None:
    """Raise a clear error when ``TRITON_INTERPRET`` changed after Triton was imported.

    ``triton.jit`` decides between compiling and interpreting when a function is defined:
    Triton's own library functions (``tl.cdiv``, ``tl.sum``) when ``triton`` is imported,
    these kernels when ``fasttangent.kernels`` is. Turning the interpreter on later would
    otherwise fail deep inside the launcher.
    """
    if not triton_interpreting():
        return
    if _interpreter_breaks_on_numpy():
        raise RuntimeError(f"{op}: Triton {triton.__version__}'s interpreter cannot run loops under NumPy "
                           f"{_numpy_version()} (NumPy 2.4 refuses the conversion it makes: 'only 0-dimensional "
                           "arrays can be converted to Python scalars'); use triton>=3.7 or numpy<2.4 with "
                           "TRITON_INTERPRET=1")
    if any(type(fn).__name__ != "InterpretedFunction" for fn in (kernel, tl.cdiv)):
        raise RuntimeError(f"{op}: TRITON_INTERPRET=1 was set after triton (or fasttangent.kernels) was imported, "
                           "so the kernels were compiled for a GPU; set it before anything imports triton")


def _numpy_version() -> str:
    import numpy
    return numpy.__version__


def _interpreter_breaks_on_numpy() -> bool:
    """Triton < 3.7 turns loop bounds into Python ints with ``int(array)`` on 1-element
    arrays, which NumPy 2.4 no longer allows (measured: triton 3.6 fails with numpy 2.4.6
    and runs with 2.3.5; triton 3.7 squeezes first)."""
    return Version(triton.__version__) < Version("3.7") and Version(_numpy_version()) >= Version("2.4")


def pick_backend(chosen: str, requested: str, tensors, op: str, dtypes=KERNEL_DTYPES) -> str:
    """Send inputs of a dtype the chosen kernel does not read (by default float64 or integers)
    to torch under ``auto``; refuse them when that kernel was asked for explicitly."""
    if chosen == "torch":
        return chosen
    odd = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype not in dtypes})
    if not odd:
        return chosen
    if requested == "auto":
        return "torch"
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    raise ValueError(f"{op}: the {chosen} kernel reads {names}, got {odd}; "
                     "cast the inputs or use backend='torch'")


@functools.lru_cache(maxsize=64)
def _upper_tile_pairs_cpu(num_tiles: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(num_tiles, num_tiles)
    return torch.stack((rows, cols), dim=1).to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _upper_tile_pairs_on(num_tiles: int, device: str) -> torch.Tensor:
    return _upper_tile_pairs_cpu(num_tiles).to(device)


def upper_tile_pairs(num_tiles: int, device: torch.device) -> torch.Tensor:
    """(T, 2) int32 (row tile, column tile) pairs with row <= column, T = nt(nt+1)/2.

    A symmetric kernel launches one program per pair, so it computes only the upper
    triangle of tiles and mirrors each off-diagonal tile into the lower one.
    """
    return _upper_tile_pairs_on(num_tiles, str(device))


def tile_grid(n1: int, n2: int, block_m: int, block_n: int, symmetric: bool, device, placeholder: torch.Tensor):
    """(pairs, programs) for a 2-d tile launch: the upper-triangle tile pairs of a symmetric
    Gram (one program each), or every tile of a cross Gram, whose kernel ignores ``pairs``
    (``placeholder`` only has to be a valid pointer)."""
    if symmetric:
        pairs = upper_tile_pairs(triton.cdiv(n1, block_m), device)
        return pairs, pairs.shape[0]
    return placeholder, triton.cdiv(n1, block_m) * triton.cdiv(n2, block_n)


def output_buffer(out: torch.Tensor | None, shape, device) -> tuple[torch.Tensor, bool]:
    """The buffer a kernel writes and whether it accumulates into it.

    ``out`` of float32/float64 is used in place (the kernel adds into it); ``None`` gets a
    fresh float32 buffer the kernel overwrites; any other ``out`` dtype gets a float32
    buffer that the caller adds into ``out`` afterwards.
    """
    if out is not None and tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)} but the result is {tuple(shape)}; pass a matching buffer")
    if out is not None and out.dtype in OUT_DTYPES:
        return out, True
    return torch.empty(shape, dtype=torch.float32, device=device), False


def finish(out: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """Return ``buffer`` as the result, adding it into ``out`` when the kernel could not write there."""
    if out is None or out is buffer:
        return buffer
    out += buffer.to(out.dtype)
    return out


if triton is not None:
    next_power_of_2 = triton.next_power_of_2
else:
    def next_power_of_2(n: int) -> int:
        """Smallest power of two >= n (Triton's helper, for when Triton is absent)."""
        return 1 << max(int(n) - 1, 0).bit_length()


def dot_block(n: int, smallest: int = 16, largest: int = 128) -> int:
    """Power-of-two tile edge for a ``tl.dot`` operand dimension of size n (>= 16, Triton's minimum)."""
    return max(smallest, min(largest, next_power_of_2(n)))


@jit
def block_product(x_ptr, y_ptr, x_rows, y_rows, x_in, y_in, stride_xr, stride_xd, stride_yr, stride_yd, d,
                   acc, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + X[x_rows] Y[y_rows]ᵀ over the d columns (masked rows read as zero)."""
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds[None, :] < d
        x = tl.load(x_ptr + x_rows[:, None] * stride_xr + ds[None, :] * stride_xd, mask=x_in & d_ok, other=0.0)
        y = tl.load(y_ptr + y_rows[:, None] * stride_yr + ds[None, :] * stride_yd, mask=y_in & d_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@jit
def store_tile(out_ptr, stride_om, stride_on, rows, cols, acc, n_rows, n_cols,
               SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr):
    """Write (or add) the tile ``acc`` at out[rows, cols].

    For a symmetric Gram (tiles with row tile <= column tile only) the entries with
    row <= column are stored and those with row < column also mirrored to out[col, row]
    by swapping the strides: every entry is written once and the result is exactly
    symmetric, diagonal tiles included (their two halves need not round alike).
    """
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    value = acc.to(out_ptr.dtype.element_ty)
    direct = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    if SYMMETRIC:
        _put(direct, value, inside & (rows[:, None] <= cols[None, :]), ACCUMULATE, ATOMIC)
        mirrored = out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_om
        _put(mirrored, value, inside & (rows[:, None] < cols[None, :]), ACCUMULATE, ATOMIC)
    else:
        _put(direct, value, inside, ACCUMULATE, ATOMIC)


@jit
def _put(pointers, value, mask, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr):
    """Store, add (read-modify-write by this program alone), or atomically add ``value``."""
    if ATOMIC:
        tl.atomic_add(pointers, value, mask=mask)
    elif ACCUMULATE:
        tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + value, mask=mask)
    else:
        tl.store(pointers, value, mask=mask)


@jit
def tile_of_program(pairs_ptr, n_cols, BLOCK_N: tl.constexpr, SYMMETRIC: tl.constexpr):
    """(row tile, column tile) of this program: the pid-th upper-triangle pair of a
    symmetric Gram, or row-major over all tiles of a cross Gram."""
    pid = tl.program_id(0)
    if SYMMETRIC:
        tile_m = tl.load(pairs_ptr + 2 * pid)
        tile_n = tl.load(pairs_ptr + 2 * pid + 1)
    else:
        tiles_n = tl.cdiv(n_cols, BLOCK_N)
        tile_m = pid // tiles_n
        tile_n = pid % tiles_n
    return tile_m, tile_n
