"""Per-device computation on the rows of the batch each device holds.

Under data or FSDP parallelism the compiler partitions most layers by the batch on its own.
Layers built on sorts, top-k and gathers over all tokens (MoE dispatch, product-key memory
reads) are the exception: it tends to gather the global batch onto every device first. Running
them inside ``jax.shard_map`` over the batch axes keeps them local.

Under tensor parallelism the residual stream is replicated over the axes that split the
hidden widths (``mlp``, ``heads``). A layer that is not itself split over them (the MoE
dispatch, the product-key memory, Hydra's workspace) would repeat the same work on each of
their devices; :func:`row_split` adds them to the row split instead, so each device takes
a slice of its rows and the outputs are gathered after. Under sequence parallelism the same
layers need whole rows: an all-to-all trades each device's length slice for a share of the
rows (rather than every device gathering the whole length and repeating the work).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsparse.parallel import current_mesh, current_rules, logical_to_spec, rule_mesh_axes


def token_shard_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch of a ``[batch, ...]`` activation."""
    spec = logical_to_spec(("batch",), (batch,), mesh, current_rules())[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[axis] for axis in axes)


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """How a per-row layer spreads ``[B, L, ...]`` activations over a mesh inside
    ``shard_map``. They are split over ``batch`` (rows) and ``length`` (sequence parallelism)
    and replicated over ``tensor`` (the axes of tensor parallelism). The rows enter split over
    ``batch`` and ``tensor`` (:attr:`spec`; the compiler slices each tensor device's share on
    entry and gathers the outputs after, which it does well); the layer needs whole rows, so
    :meth:`scatter` trades each device's length slice for a share of its rows with an
    all-to-all over ``length``, and :meth:`gather` trades them back. Every row is then
    computed by exactly one device."""

    batch: tuple[str, ...] = ()
    length: tuple[str, ...] = ()
    tensor: tuple[str, ...] = ()

    @property
    def spec(self) -> P:
        """The specs of ``[B, L, ...]`` activations entering and leaving ``shard_map``."""
        return P(self.batch + self.tensor or None, self.length or None)

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis whose devices hold different rows after :meth:`scatter` (statistics
        averaged over these are the global ones)."""
        return self.batch + self.tensor + self.length

    def __bool__(self) -> bool:
        return bool(self.axes)

    def scatter(self, x):
        """Inside ``shard_map``: ``[rows, L / s, ...] -> [rows / s, L, ...]``."""
        return jax.lax.all_to_all(x, self.length, 0, 1, tiled=True) if self.length else x

    def gather(self, y):
        """Inside ``shard_map``: the inverse of :meth:`scatter`."""
        return jax.lax.all_to_all(y, self.length, 1, 0, tiled=True) if self.length else y


def row_split(mesh, shape) -> RowSplit:
    """The :class:`RowSplit` of ``[B, L, ...]`` activations of ``shape`` on ``mesh`` under the
    current rules: rows over the batch axes (:func:`token_shard_axes`); the length's sequence
    axes and the tensor-parallel axes (those of the logical ``mlp`` and ``heads``) join the
    row split when each device's rows divide among them, else the rows are computed whole on
    every device of those axes (after a gather of the length)."""
    batch_axes = token_shard_axes(mesh, shape[0])
    rows = shape[0] // _size(mesh, batch_axes)
    length = tuple(a for a in rule_mesh_axes("length", mesh) if a not in batch_axes)
    if len(shape) < 2 or shape[1] % _size(mesh, length) or rows % _size(mesh, length):
        length = ()
    rows //= _size(mesh, length)
    widths = rule_mesh_axes("mlp", mesh) + rule_mesh_axes("heads", mesh)
    tensor = tuple(dict.fromkeys(a for a in widths if a not in batch_axes + length))
    if rows % _size(mesh, tensor):
        tensor = ()
    return RowSplit(batch_axes, length, tensor)


def batch_local(module, x_BLD, method: str = "__call__", *, per_token: bool = False, **rows):
    """``module.method(x, **rows)`` with each device computing its own rows of the batch
    (spread by :func:`row_split`); ``rows`` are further ``[B, L, ...]`` operands that follow
    ``x``'s rows (segment ids; None is passed as it is).

    For per-row layers whose internals (top-k over product keys, gathers from a table, a
    recurrence over chunks) the compiler would otherwise partition by gathering the global
    batch onto every device, or repeat on every device of tensor or sequence parallelism. The
    module's state enters ``shard_map`` whole (FSDP-split parameters are gathered, as for any
    layer); gradients flow back through it. Outside a mesh with a split: a plain call.
    Modules that write state during the call (sown values, counters) are not supported.
    ``per_token=True`` declares that each token's output depends on that token alone (the
    product-key memory): under sequence parallelism it then runs on each device's slice of
    the length as it is, without the all-to-alls that give a recurrence whole rows."""
    mesh = current_mesh()
    split = RowSplit() if mesh is None else row_split(mesh, x_BLD.shape)
    given = {name: value for name, value in rows.items() if value is not None}
    absent = {name: None for name in rows if name not in given}
    if not split:
        return getattr(module, method)(x_BLD, **rows)
    graphdef, state = nnx.split(module)

    def local(state, x_BLD, given):
        call = getattr(nnx.merge(graphdef, state), method)
        if per_token:
            return call(x_BLD, **given, **absent)
        given = {name: split.scatter(value) for name, value in given.items()}
        return split.gather(call(split.scatter(x_BLD), **given, **absent))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), split.spec, split.spec),
                         out_specs=split.spec, check_vma=False)(state, x_BLD, given)


def rows_local(fn, *xs):
    """``fn(*xs) -> [B, L, ...]`` for a function that is independent per row, of ``[B, L, ...]``
    operands, with each device computing a share of whole rows (:func:`row_split`: the rows
    over the batch and tensor axes, and each device's length slice traded for rows by one
    all-to-all over the sequence axes). For per-row work that scans the length in blocks
    (SGA's query blocks): left to the compiler on a length-split batch, every block's
    ``dynamic_slice`` of the keys became an all-gather of the whole length, once per block
    (a 3-block ``hydra_1p6b`` on fsdp2 × sequence2 × tensor2: 32 gathers of 2 GiB per
    block and pass). Outside a mesh with a split: a plain call."""
    mesh = current_mesh()
    split = RowSplit() if mesh is None else row_split(mesh, xs[0].shape)
    if not split:
        return fn(*xs)

    def local(*xs):
        return split.gather(fn(*(split.scatter(x) for x in xs)))

    return jax.shard_map(local, mesh=mesh, in_specs=(split.spec,) * len(xs),
                         out_specs=split.spec, check_vma=False)(*xs)


def heads_local(fn, xs_BLHD, xs_BL=(), *, split_heads: bool = True):
    """``fn(*xs_BLHD, *xs_BL) -> [B, L, H, D]`` for a layer that is independent per row and
    per head (attention), run inside ``jax.shard_map`` on each device's rows (the batch axes)
    and heads (the axes of the logical ``heads``, when every operand's head count divides;
    ``split_heads=False`` keeps them whole, e.g. for per-head masks). The length is whole.

    The compiler does not partition the block-sparse attention's gathers of key/value tiles
    (nor custom kernels) by heads: it computes them for every head on each tensor rank and
    all-reduces (``transformer_1p3b`` under fsdp2 × tensor4: 1689 GiB of collectives per
    device and step, 776 with this). Key/value heads are split over the same axes as the
    query heads, so GQA groups stay on one device. ``[B, L]`` operands (segment ids) follow
    the rows. Outside a mesh, or with nothing split: a plain call."""
    mesh = current_mesh()
    if mesh is None:
        return fn(*xs_BLHD, *xs_BL)
    batch_axes = token_shard_axes(mesh, xs_BLHD[0].shape[0])
    head_axes = tuple(a for a in rule_mesh_axes("heads", mesh) if a not in batch_axes)
    if not split_heads or any(x.shape[2] % _size(mesh, head_axes) for x in xs_BLHD):
        head_axes = ()
    if not batch_axes + head_axes:
        return fn(*xs_BLHD, *xs_BL)
    spec_BLHD = P(batch_axes or None, None, head_axes or None)
    spec_BL = P(batch_axes or None, None)
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=(spec_BLHD,) * len(xs_BLHD) + (spec_BL,) * len(xs_BL),
                         out_specs=spec_BLHD, check_vma=False)(*xs_BLHD, *xs_BL)
