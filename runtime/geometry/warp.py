"""The crop warp as an explicit linear operator: bilinear sampling forward, its exact adjoint backward.

**Coordinates.** Continuous image coordinates put pixel (row ``i``, column ``j``) on the unit square
``[j, j+1) x [i, i+1)``, so its centre is ``(j + 0.5, i + 0.5)``; ``x`` runs along columns, ``y`` down
rows. This is the half-pixel convention of Pillow's ``transform``, OpenCV's ``resize`` and TF's
``half_pixel_centers``, and it makes scaling exact: a chip of side ``a`` maps onto a crop of side ``b``
by multiplying coordinates with ``b / a``, with no half-pixel shift.

**The warp.** A 2x3 affine matrix ``M`` maps crop coordinates ``(u, v)`` to photo coordinates::

    [x, y]^T = M[:, :2] @ [u, v]^T + M[:, 2]

Crop pixel ``(r, c)`` samples the photo ``P`` at ``(x, y) = M (c + 0.5, r + 0.5)``. In index space
``px = x - 0.5``, ``py = y - 0.5``, with ``x0 = floor(px)``, ``y0 = floor(py)``, ``a = px - x0``,
``b = py - y0``::

    crop[r, c] = (1-a)(1-b) P[y0, x0] + a(1-b) P[y0, x0+1] + (1-a)b P[y0+1, x0] + ab P[y0+1, x0+1]

**Out of bounds: clamp.** Tap indices are clamped to the photo (edge replication), so a face near
the border is padded with its own edge colours rather than black, which recognizers never saw in
training. Clamping only changes which pixel a weight lands on, so the map stays linear.

So ``crop = W P`` with ``W`` a sparse ``[S*S, H*W]`` matrix of 4 non-zeros per row, the same for
every channel, and the adjoint ``W^T g`` scatters each crop gradient onto the same 4 pixels with the
same weights (``<W P, g> = <P, W^T g>`` exactly, up to float rounding).

**Shrinking by 2x or more** (a large face in a high-resolution photo), the photo is first averaged
over ``f x f`` pixel blocks and then sampled bilinearly (see ``Warp(antialias=...)``), so that every
face pixel contributes to the crop and receives gradient.

**Bounding box.** Every tap lies in :attr:`Warp.box`, the half-open pixel rectangle the crop reads,
so forward and adjoint work on that sub-array only: a 224-px crop from a 12 MP photo touches a few
hundred thousand pixels, not twelve million.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import Float32Array, Float64Array, IntArray
from uncnn_rt.runtime.errors import InputError


class Box(NamedTuple):
    """A half-open pixel rectangle: rows ``top .. bottom-1``, columns ``left .. right-1``."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def slices(self) -> tuple[slice, slice]:
        """``photo[box.slices]`` is the box's sub-array (a view)."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def union(self, other: Box) -> Box:
        return Box(
            min(self.top, other.top),
            min(self.left, other.left),
            max(self.bottom, other.bottom),
            max(self.right, other.right),
        )


def apply_affine(matrix: ArrayLike, points: ArrayLike) -> Float64Array:
    """``M[:, :2] p + M[:, 2]`` for each row ``p`` of ``points [K, 2]``; returns ``[K, 2]``."""
    m = _affine(matrix)
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise InputError(f"points must be [K, 2] (x, y) rows, got shape {list(p.shape)}")
    return np.asarray(p @ m[:, :2].T + m[:, 2], dtype=np.float64)


def invert_affine(matrix: ArrayLike) -> Float64Array:
    """The inverse map of an invertible 2x3 affine ``M``: ``[A^-1, -A^-1 t]``."""
    m = _affine(matrix)
    a = m[:, :2]
    det = float(np.linalg.det(a))
    scale = float(np.abs(a).max())
    if not abs(det) > 1e-12 * scale * scale:
        raise InputError(f"affine matrix is singular (determinant {det:.3g}): {m.tolist()}")
    a_inv = np.linalg.inv(a)
    return np.asarray(np.concatenate([a_inv, -(a_inv @ m[:, 2:])], axis=1), dtype=np.float64)


def _affine(matrix: ArrayLike) -> Float64Array:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise InputError(f"an affine matrix must be 2x3, got shape {list(m.shape)}")
    if not np.isfinite(m).all():
        raise InputError(f"affine matrix has non-finite entries: {m.tolist()}")
    return m


def _photo_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
        raise InputError(f"photo shape must start with (height >= 1, width >= 1), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


class Warp:
    """Bilinear sampling of an ``S x S`` crop from an ``H x W x C`` photo, and its adjoint.

    Args:
        crop_to_photo: 2x3 affine ``M`` from crop to photo coordinates (see the module docstring);
            in practice a similarity from :mod:`uncnn_rt.runtime.geometry.align`.
        photo_shape: ``(H, W)`` or ``(H, W, C)`` of the photo.
        size: the crop side ``S``.
        antialias: when the crop shrinks the photo by ``s >= 2`` (``s`` the smaller singular value
            of ``M[:, :2]``), first average ``f x f`` pixel blocks, ``f = floor(s)``, then sample
            bilinearly on that grid (``M / f``, a shrink by ``s / f < 2``). Plain bilinear sampling
            at ``s >= 2`` reads only 4 pixels per crop pixel: the crop aliases, and the adjoint puts
            gradient on a sparse lattice of photo pixels only, a dotted cloak that any resize or
            JPEG averages away. With the block average every pixel of the face gets gradient. The
            block average ``D`` is linear (``D^T`` spreads ``g / n`` back over each block), so the
            warp ``W = B D`` keeps an exact adjoint ``D^T B^T``. ``s < 2``: plain bilinear.

    The taps and weights are computed once; :meth:`apply_region` and :meth:`adjoint` then cost one
    gather and one ``bincount`` over ``4 S^2 C`` entries each (plus the block sums when ``f > 1``).
    """

    def __init__(
        self, crop_to_photo: ArrayLike, photo_shape: Sequence[int], size: int, *, antialias: bool = True
    ) -> None:
        m = _affine(crop_to_photo)
        if int(size) < 1:
            raise InputError(f"crop size must be >= 1, got {size}")
        self.matrix: Float64Array = m
        self.size: int = int(size)
        self.photo_shape: tuple[int, int] = _photo_shape(photo_shape)
        height, width = self.photo_shape
        shrink = float(np.linalg.svd(m[:, :2], compute_uv=False).min())
        self.factor: int = max(1, int(np.floor(shrink + 1e-9))) if antialias else 1
        f = self.factor
        grid_shape = (-(-height // f), -(-width // f))
        self._grid_box, self._rows, self._cols, self._weight = _bilinear_taps(m / f, grid_shape, self.size)
        g = self._grid_box
        self.box: Box = Box(g.top * f, g.left * f, min(g.bottom * f, height), min(g.right * f, width))
        self._block_rows = _block_sizes(self.box.height, f)
        self._block_cols = _block_sizes(self.box.width, f)
        self._flat: dict[tuple[int, int], IntArray] = {}

    def _flat_index(self, row_stride: int, channels: int) -> IntArray:
        """``[S*S, 4, C]`` indices into a C-order ``[rows, row_stride, C]`` array starting at the grid box."""
        key = (row_stride, channels)
        if key not in self._flat:
            pixel = self._rows * row_stride + self._cols
            self._flat[key] = pixel[:, :, None] * channels + np.arange(channels)
        return self._flat[key]

    def _gather(self, flat: NDArray[np.float32], index: IntArray) -> Float32Array:
        taps = np.take(flat, index)  # [S*S, 4, C]
        out = np.einsum("pk,pkc->pc", self._weight, taps)
        return np.asarray(out, dtype=np.float32).reshape(self.size, self.size, index.shape[2])

    def apply(self, photo: NDArray[np.generic]) -> Float32Array:
        """The crop ``W P``: ``[S, S, C]`` float32 from the whole photo ``[H, W, C]``."""
        array = np.asarray(photo)
        if array.ndim != 3 or (array.shape[0], array.shape[1]) != self.photo_shape:
            raise InputError(
                f"expected a photo of shape [{self.photo_shape[0]}, {self.photo_shape[1]}, C], "
                f"got {list(array.shape)}"
            )
        if self.factor == 1 and array.dtype == np.float32 and array.flags.c_contiguous:
            # Gather straight from the photo's buffer: no copy of the box region.
            channels, width = array.shape[2], array.shape[1]
            base = (self.box.top * width + self.box.left) * channels
            return self._gather(array.reshape(-1), base + self._flat_index(width, channels))
        return self.apply_region(array[self.box.slices])

    def apply_region(self, region: NDArray[np.generic]) -> Float32Array:
        """The crop from the photo's sub-array ``photo[box.slices]`` alone, ``[box h, box w, C]``."""
        array = np.asarray(region)
        expected = (self.box.height, self.box.width)
        if array.ndim != 3 or (array.shape[0], array.shape[1]) != expected:
            raise InputError(
                f"expected the box region of shape [{expected[0]}, {expected[1]}, C], got {list(array.shape)}"
            )
        if self.factor > 1:
            grid = _block_mean(array, self.factor, self._block_rows, self._block_cols)
        else:
            grid = np.ascontiguousarray(array, dtype=np.float32)
        return self._gather(grid.reshape(-1), self._flat_index(self._grid_box.width, array.shape[2]))

    def adjoint(self, grad_crop: NDArray[np.generic]) -> Float32Array:
        """``W^T g`` restricted to :attr:`box`: ``[box h, box w, C]`` float32 (zero elsewhere).

        Each crop pixel's gradient is scattered onto its 4 taps with the forward weights; taps that
        coincide (clamped at the border) simply add up. With ``f > 1`` each grid cell's sum is then
        spread evenly over the cell's ``n`` photo pixels (divided by ``n``).
        """
        g = np.asarray(grad_crop)
        if g.ndim != 3 or g.shape[:2] != (self.size, self.size):
            raise InputError(f"expected a crop gradient [{self.size}, {self.size}, C], got {list(g.shape)}")
        channels = g.shape[2]
        grid = self._grid_box
        contributions = self._weight[:, :, None] * g.reshape(-1, 1, channels).astype(np.float32)
        summed = np.bincount(
            self._flat_index(grid.width, channels).ravel(),
            weights=contributions.ravel(),
            minlength=grid.height * grid.width * channels,
        )
        grid_grad = summed.astype(np.float32).reshape(grid.height, grid.width, channels)
        if self.factor == 1:
            return grid_grad
        return _block_spread(grid_grad, self.factor, self._block_rows, self._block_cols)

    def adjoint_photo(self, grad_crop: NDArray[np.generic]) -> Float32Array:
        """``W^T g`` as a full ``[H, W, C]`` array: convenient for small photos and tests."""
        region = self.adjoint(grad_crop)
        out = np.zeros((*self.photo_shape, region.shape[2]), dtype=np.float32)
        out[self.box.slices] = region
        return out

    def to_photo(self, points: ArrayLike) -> Float64Array:
        """Map crop coordinates ``[K, 2]`` (x, y) to photo coordinates."""
        return apply_affine(self.matrix, points)

    def footprint(self, inset: float = 0.0) -> Float64Array:
        """The crop square ``[inset, S - inset]^2`` mapped into the photo: ``[4, 2]`` corners, in order."""
        lo, hi = float(inset), self.size - float(inset)
        return self.to_photo([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])


def _bilinear_taps(
    m: Float64Array, shape: tuple[int, int], size: int
) -> tuple[Box, IntArray, IntArray, Float32Array]:
    """Box, box-relative tap rows and columns ``[S*S, 4]`` and weights ``[S*S, 4]`` of bilinear sampling."""
    height, width = shape
    centres = np.arange(size, dtype=np.float64) + 0.5
    u, v = np.meshgrid(centres, centres)  # u[r, c] = c + 0.5, v[r, c] = r + 0.5
    px = (m[0, 0] * u + m[0, 1] * v + m[0, 2]).ravel() - 0.5
    py = (m[1, 0] * u + m[1, 1] * v + m[1, 2]).ravel() - 0.5
    fx, fy = np.floor(px), np.floor(py)
    a, b = px - fx, py - fy
    # A zero-weight second tap stays on the first, so an exact grid position reads nothing beyond it.
    # Clamping in float first keeps a far-off crop from overflowing the int cast.
    x0 = np.clip(fx, 0, width - 1).astype(np.intp)
    x1 = np.clip(np.where(a > 0, fx + 1, fx), 0, width - 1).astype(np.intp)
    y0 = np.clip(fy, 0, height - 1).astype(np.intp)
    y1 = np.clip(np.where(b > 0, fy + 1, fy), 0, height - 1).astype(np.intp)
    box = Box(int(y0.min()), int(x0.min()), int(y1.max()) + 1, int(x1.max()) + 1)
    rows = np.stack([y0, y0, y1, y1], axis=1) - box.top
    cols = np.stack([x0, x1, x0, x1], axis=1) - box.left
    weight = np.stack([(1 - a) * (1 - b), a * (1 - b), (1 - a) * b, a * b], axis=1).astype(np.float32)
    return box, rows, cols, weight


def _block_sizes(length: int, f: int) -> IntArray:
    """Sizes of the ``f``-pixel blocks covering ``length`` pixels (the last one may be shorter)."""
    sizes = np.full(-(-length // f), f, dtype=np.intp)
    if length % f:
        sizes[-1] = length % f
    return sizes


def _block_mean(
    region: NDArray[np.generic], f: int, block_rows: IntArray, block_cols: IntArray
) -> Float32Array:
    """Mean of each ``f x f`` block (shorter at the photo's border): ``D x``.

    Summed as ``f + f`` strided slices (row offset ``i`` of every block, then column offset ``j``),
    which reads the region once per offset without copying it first.
    """
    x = np.asarray(region)
    rows = np.zeros((block_rows.size, x.shape[1], x.shape[2]), dtype=np.float32)
    for i in range(f):
        part = x[i::f]
        rows[: part.shape[0]] += part
    sums = np.zeros((block_rows.size, block_cols.size, x.shape[2]), dtype=np.float32)
    for j in range(f):
        part = rows[:, j::f]
        sums[:, : part.shape[1]] += part
    counts = (block_rows[:, None] * block_cols[None, :]).astype(np.float32)
    sums /= counts[:, :, None]
    return sums


def _block_spread(
    grid_grad: Float32Array, f: int, block_rows: IntArray, block_cols: IntArray
) -> Float32Array:
    """``D^T g``: each cell's value divided by its pixel count, copied onto each of its pixels."""
    counts = (block_rows[:, None] * block_cols[None, :]).astype(np.float32)
    per_pixel = grid_grad / counts[:, :, None]
    out = np.empty((int(block_rows.sum()), int(block_cols.sum()), grid_grad.shape[2]), dtype=np.float32)
    for i in range(f):
        for j in range(f):
            target = out[i::f, j::f]
            target[...] = per_pixel[: target.shape[0], : target.shape[1]]
    return out


class WarpBatch:
    """Several faces of one photo: a batch of crops ``[N, S, S, C]`` and the sum of their adjoints.

    :attr:`box` is the union of the faces' boxes. Faces far apart make it large; the per-face
    operators stay available as :attr:`warps` for per-face perturbations.
    """

    def __init__(self, warps: Sequence[Warp]) -> None:
        if not warps:
            raise InputError("a warp batch needs at least one face, got none")
        first = warps[0]
        for w in warps[1:]:
            if w.size != first.size or w.photo_shape != first.photo_shape:
                raise InputError(
                    f"all warps of a batch must share crop size and photo shape: "
                    f"{first.size}/{first.photo_shape} vs {w.size}/{w.photo_shape}"
                )
        self.warps: tuple[Warp, ...] = tuple(warps)
        self.size: int = first.size
        self.photo_shape: tuple[int, int] = first.photo_shape
        box = first.box
        for w in warps[1:]:
            box = box.union(w.box)
        self.box: Box = box

    @classmethod
    def from_matrices(cls, crop_to_photo: ArrayLike, photo_shape: Sequence[int], size: int) -> WarpBatch:
        """One warp per 2x3 matrix of ``crop_to_photo [N, 2, 3]``."""
        matrices = np.asarray(crop_to_photo, dtype=np.float64)
        if matrices.ndim != 3 or matrices.shape[1:] != (2, 3):
            raise InputError(f"expected [N, 2, 3] affine matrices, got shape {list(matrices.shape)}")
        return cls([Warp(m, photo_shape, size) for m in matrices])

    def __len__(self) -> int:
        return len(self.warps)

    def apply(self, photo: NDArray[np.generic]) -> Float32Array:
        """Crops ``[N, S, S, C]`` from the whole photo ``[H, W, C]``."""
        return np.stack([w.apply(photo) for w in self.warps])

    def adjoint(self, grad_crops: NDArray[np.generic]) -> Float32Array:
        """``sum_n W_n^T g_n`` over :attr:`box`: ``[box h, box w, C]`` float32."""
        g = np.asarray(grad_crops)
        if g.ndim != 4 or g.shape[0] != len(self.warps):
            raise InputError(
                f"expected crop gradients [{len(self.warps)}, {self.size}, {self.size}, C], "
                f"got {list(g.shape)}"
            )
        out = np.zeros((self.box.height, self.box.width, g.shape[3]), dtype=np.float32)
        for warp, grad in zip(self.warps, g, strict=True):
            b = warp.box
            rows = slice(b.top - self.box.top, b.bottom - self.box.top)
            cols = slice(b.left - self.box.left, b.right - self.box.left)
            out[rows, cols] += warp.adjoint(grad)
        return out


def box_polygon(box: Box) -> Float64Array:
    """The four corners of a pixel box in continuous coordinates (pixel edges), ``[4, 2]``."""
    return np.array(
        [[box.left, box.top], [box.right, box.top], [box.right, box.bottom], [box.left, box.bottom]],
        dtype=np.float64,
    )


def feather_mask(
    shape: Sequence[int],
    region: Box | ArrayLike,
    feather_px: float,
    *,
    grow_px: float = 0.0,
    within: Box | None = None,
) -> Float32Array:
    """A smooth mask in ``[0, 1]`` of a convex face region, evaluated at pixel centres.

    With ``d(p)`` the signed depth of pixel centre ``p`` inside the polygon (positive inside; the
    minimum over edges of the distance to each edge's line, exact inside a convex polygon) and
    ``t = clip((d + grow_px) / feather_px, 0, 1)``::

        mask = t^2 (3 - 2t)        (smoothstep: 0 at the grown edge, 1 at feather_px inside it)

    ``feather_px = 0`` gives a hard mask ``d + grow_px > 0``. Outside the polygon the depth is the
    most violated edge's signed distance, so with ``grow_px > 0`` the grown region's corners are
    square-ish rather than rounded.

    Args:
        shape: ``(H, W)`` (or ``(H, W, C)``) of the photo.
        region: a :class:`Box`, or a convex polygon ``[K, 2]`` of (x, y) vertices in continuous photo
            coordinates, in either winding order (e.g. :meth:`Warp.footprint`).
        feather_px: width of the soft edge, in photo pixels (>= 0).
        grow_px: moves the edge outwards (> 0) or inwards (< 0), in photo pixels.
        within: evaluate on this box only and return ``[box h, box w]`` (e.g. a warp's box, so a
            12 MP photo does not need a full-size mask); default the whole photo.

    Returns:
        float32 ``[H, W]``, or ``[within.height, within.width]``.
    """
    height, width = _photo_shape(shape)
    if not feather_px >= 0:
        raise InputError(f"feather_px must be >= 0, got {feather_px}")
    polygon = box_polygon(region) if isinstance(region, Box) else np.asarray(region, dtype=np.float64)
    normals, offsets = _inward_edges(polygon)
    area = within if within is not None else Box(0, 0, height, width)
    if area.height < 0 or area.width < 0:
        raise InputError(f"evaluation box must not be inverted, got {area}")
    xs = np.arange(area.left, area.right, dtype=np.float64) + 0.5
    ys = np.arange(area.top, area.bottom, dtype=np.float64) + 0.5
    depth = np.full((area.height, area.width), np.inf)
    for (nx, ny), c in zip(normals, offsets, strict=True):
        np.minimum(depth, (ny * ys - c)[:, None] + nx * xs[None, :], out=depth)
    depth += grow_px
    if feather_px == 0:
        return (depth > 0).astype(np.float32)
    t = np.clip(depth / feather_px, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _inward_edges(polygon: Float64Array) -> tuple[Float64Array, Float64Array]:
    """Unit inward normals ``n_k`` and offsets ``c_k`` with depth ``n_k . p - c_k`` for each edge."""
    if polygon.ndim != 2 or polygon.shape[1] != 2 or polygon.shape[0] < 3:
        raise InputError(f"a region polygon must be [K >= 3, 2] vertices, got shape {list(polygon.shape)}")
    if not np.isfinite(polygon).all():
        raise InputError("region polygon has non-finite vertices")
    nxt = np.roll(polygon, -1, axis=0)
    area2 = float(np.sum(polygon[:, 0] * nxt[:, 1] - nxt[:, 0] * polygon[:, 1]))
    if area2 == 0:
        raise InputError("region polygon has zero area")
    if area2 < 0:
        polygon = polygon[::-1]
        nxt = np.roll(polygon, -1, axis=0)
    edges = nxt - polygon
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    edges, starts, lengths = edges[keep], polygon[keep], lengths[keep]
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if (turns < -1e-9 * lengths * np.roll(lengths, -1)).any():
        raise InputError("region polygon must be convex (a crop footprint, box or ellipse)")
    # With positive signed area the interior lies left of each edge: inward normal (-dy, dx).
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / lengths[:, None]
    offsets = np.sum(normals * starts, axis=1)
    return normals, offsets
