"""DAVIS-2017 region (J) and boundary (F) measures, exactly as the official davis2017 toolkit computes them.

Definitions (toolkit semantics):

- J = |(P & G) & ~V| / |(P | G) & ~V|, and 1 when that union is 0.
- F: both masks lose the void pixels first (P' = P & ~V, G' = G & ~V). Boundary maps come from the toolkit's
  ``_seg2bmap``: a pixel is a boundary pixel if it differs from its right, bottom or bottom-right neighbour,
  except that the last row compares only to the right, the last column only downward and the bottom-right
  pixel is 0. That is the same as comparing with an edge-replicated (not zero) padding on the bottom and right,
  so the image border is never a boundary (``seg2bmap``). Each boundary map is dilated with
  ``skimage.morphology.disk(r)`` (the offsets (dy, dx) with dy^2 + dx^2 <= r^2; the toolkit applies it with
  ``cv2.dilate``, pixels outside the image contribute nothing), r = ceil(bound_th * hypot(H, W)), or bound_th
  itself when bound_th >= 1. Precision = |b(P') & dil(b(G'))| / |b(P')|, recall = |b(G') & dil(b(P'))| / |b(G')|,
  with P=1, R=0 when only the predicted boundary is empty, P=0, R=1 when only the GT boundary is empty and
  P=R=1 when both are, and F = 2PR / (P + R) (0 when P + R = 0).

How it is computed here (same values, different algorithm): every frame is cropped to the bounding box of its
non-void foreground (plus one pixel, where boundaries can appear), the boundary maps of all frames and objects
are packed into 64-bit words (one bit per pixel), and the disk dilation is done on the packed words as an OR
over the disk's rows of horizontally dilated rows (horizontal dilation by shifting words). Matches are popcounts
of AND-ed words. Counts are integers, and the final divisions are done with the toolkit's float64 expressions,
so the values are bit-identical to the toolkit's.

The toolkit's unsupervised protocol (the one Ref-DAVIS17 uses) is ``evaluate_unsupervised``: J and F for every
(predicted id, GT object) pair, Hungarian matching on -mean_t (J + F) / 2, GT object count from the first frame.
``evaluate_ref_davis`` runs it for each annotator and averages the four global tables.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "GLOBAL_MEASURES",
    "DEFAULT_BOUND_TH",
    "UnsupervisedResult",
    "RefDavisResult",
    "boundary_radius",
    "disk",
    "seg2bmap",
    "region_similarity",
    "boundary_measure",
    "jf_measures",
    "db_statistics",
    "evaluate_unsupervised",
    "global_table",
    "evaluate_ref_davis",
]

DEFAULT_BOUND_TH = 0.008
GLOBAL_MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
MAX_PROPOSALS = 20  # the toolkit's max_n_proposals
_CHUNK_BYTES = 16 << 20  # rough bound on the bool staging buffer of one chunk of frames


# ----------------------------------------------------------------------------------------------------------------
# small building blocks
# ----------------------------------------------------------------------------------------------------------------


def boundary_radius(height: int, width: int, bound_th: float = DEFAULT_BOUND_TH) -> int:
    """Dilation radius of the F measure: ceil(bound_th * hypot(H, W)), or bound_th itself when bound_th >= 1.

    480x854 -> 8, 360x640 -> 6. The toolkit computes ``np.ceil(bound_th * np.linalg.norm((H, W)))``; we do the
    same. A radius given directly (bound_th >= 1) must be a whole number: skimage's disk of a fractional radius
    is an even-sized kernel whose centre cv2 places off-centre, which we do not reproduce.
    """
    if bound_th <= 0:
        raise ValueError(f"bound_th must be positive, got {bound_th}")
    if bound_th >= 1:
        if float(bound_th) != int(bound_th):
            raise ValueError(f"a boundary radius given in pixels must be a whole number, got bound_th={bound_th}")
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm((height, width))))


def disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk(radius) as bool: (2r+1, 2r+1), True where dy^2 + dx^2 <= r^2."""
    r = int(radius)
    offs = np.arange(-r, r + 1)
    return (offs[:, None] ** 2 + offs[None, :] ** 2) <= r * r


def _disk_half_widths(radius: int) -> list[int]:
    """Half-width of the disk's row at vertical offset |dy| = 0..r (floor(sqrt(r^2 - dy^2)), exact)."""
    return [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """The toolkit's ``_seg2bmap`` for masks of shape (..., H, W): a bool boundary map of the same shape.

    A pixel is on the boundary when it differs from its right, bottom or bottom-right neighbour, with the
    neighbours beyond the last row/column taken from an edge-replicated copy (which is what the toolkit's
    special rules for the last row, last column and bottom-right pixel amount to). A mask touching the image
    border therefore has no boundary along that border.
    """
    seg = np.asarray(seg).astype(bool, copy=False)
    if seg.ndim < 2:
        raise ValueError(f"seg2bmap needs masks of shape (..., H, W), got shape {seg.shape}")
    pad = [(0, 0)] * (seg.ndim - 2) + [(0, 1), (0, 1)]
    ext = np.pad(seg, pad, mode="edge")
    return _bmap_from_ext(ext)


def _bmap_from_ext(ext: np.ndarray) -> np.ndarray:
    """Boundary of ext[..., :-1, :-1] given one extra row/column of neighbours (..., h+1, w+1) -> (..., h, w)."""
    c = ext[..., :-1, :-1]
    b = c ^ ext[..., :-1, 1:]
    b |= c ^ ext[..., 1:, :-1]
    b |= c ^ ext[..., 1:, 1:]
    return b


def _as_bool(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool:
        a = a.astype(bool)
    return a


def _check_stack(gt, pred, void, name: str | None):
    where = f" for sequence {name!r}" if name else ""
    gt = _as_bool(gt)
    pred = _as_bool(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch of gt {gt.shape} and pred {pred.shape}{where}")
    if gt.ndim not in (2, 3):
        raise ValueError(f"masks must be (T, H, W) or (H, W), got shape {gt.shape}{where}")
    if void is not None:
        void = _as_bool(void)
        if void.shape != gt.shape:
            raise ValueError(f"shape mismatch of void {void.shape} and gt {gt.shape}{where}")
    return gt, pred, void


# ----------------------------------------------------------------------------------------------------------------
# J
# ----------------------------------------------------------------------------------------------------------------


def _j_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Toolkit J from integer counts: inter / union, 1 where union is 0."""
    inter = np.asarray(inter)
    union = np.asarray(union)
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    j = np.asarray(j, dtype=np.float64)
    j[np.isclose(union, 0)] = 1
    return j


def region_similarity(gt, pred, void=None, *, name: str | None = None):
    """J per frame, as ``davis2017.metrics.db_eval_iou(gt, pred, void)``.

    gt, pred, void: (T, H, W) (or (H, W)) masks; anything nonzero is foreground / void.
    Returns float64 (T,) (a float for 2-D input). ``name`` only labels error messages.
    """
    return _single_object_jf(gt, pred, void, DEFAULT_BOUND_TH, name, need_f=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# F: windows, packed boundaries, packed disk dilation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """Rows [y0, y1) x cols [x0, x1) that hold every boundary pixel of one frame, in image coordinates."""

    y0: int
    y1: int
    x0: int
    x1: int
    ymin: int  # first / last foreground row (the rows that can hold foreground)
    ymax: int


def _window(fg: np.ndarray) -> _Window | None:
    """Window of the boundary pixels of any mask whose foreground lies in ``fg`` (H, W); None if fg is empty.

    A boundary pixel is a foreground pixel or has a foreground right/bottom/bottom-right neighbour, so the
    boundary lies in the foreground's bounding box grown by one pixel up and left.
    """
    flat = fg.reshape(-1)
    k = int(np.argmax(flat))  # first foreground pixel in row-major order (stops early)
    if not flat[k]:
        return None
    ymin = k // fg.shape[1]
    ymax = ymin + int(np.flatnonzero(fg[ymin:].any(axis=1))[-1])
    cols = np.flatnonzero(fg[ymin : ymax + 1].any(axis=0))
    return _Window(max(ymin - 1, 0), ymax + 1, max(int(cols[0]) - 1, 0), int(cols[-1]) + 1, ymin, ymax)


def _extended(a: np.ndarray, win: _Window) -> np.ndarray:
    """a[..., y0:y1+1, x0:x1+1] with the row/column beyond the image edge-replicated: (..., h+1, w+1).

    The extra row/column holds the bottom/right neighbours of the window; beyond the image they are copies of
    the last row/column, which gives the toolkit's last-row / last-column rules (see ``seg2bmap``).
    """
    h_img, w_img = a.shape[-2:]
    ext = a[..., win.y0 : min(win.y1 + 1, h_img), win.x0 : min(win.x1 + 1, w_img)]
    pad_b = 1 if win.y1 == h_img else 0
    pad_r = 1 if win.x1 == w_img else 0
    if pad_b or pad_r:
        ext = np.pad(ext, [(0, 0)] * (a.ndim - 2) + [(0, pad_b), (0, pad_r)], mode="edge")
    return ext


# Packed bit planes: a plane is (rows, NW) little-endian uint64 words, bit k of word j = pixel 64 j + k of the
# row. Planes are laid out back to back and every plane has zero margins of at least max(r, 1) rows / bits around
# its content, so shifting the flat word array (across row and plane ends) never moves content into another row.
_U64 = np.dtype("<u8")


def _shift_up(x: np.ndarray, s: int) -> np.ndarray:
    """Flat packed words: out[pos] = x[pos - s] for 1 <= s <= 63 (content moves s pixels right)."""
    out = x << np.uint64(s)
    out[1:] |= x[:-1] >> np.uint64(64 - s)
    return out


def _shift_down(x: np.ndarray, s: int) -> np.ndarray:
    """Flat packed words: out[pos] = x[pos + s] for 1 <= s <= 63 (content moves s pixels left)."""
    out = x >> np.uint64(s)
    out[:-1] |= x[1:] << np.uint64(64 - s)
    return out


def _next_row(x: np.ndarray, nw: int) -> np.ndarray:
    """Flat packed words: out[row] = x[row + 1] (rows of nw words)."""
    out = np.zeros_like(x)
    out[:-nw] = x[nw:]
    return out


def _packed_boundary(c: np.ndarray, nw: int) -> np.ndarray:
    """``_bmap_from_ext`` on flat packed masks: c differs from its right, bottom or bottom-right neighbour."""
    e = _shift_down(c, 1)
    b = c ^ e
    b |= c ^ _next_row(c, nw)
    b |= c ^ _next_row(e, nw)
    return b


def _dilate_packed(x: np.ndarray, radius: int, nw: int) -> np.ndarray:
    """Binary dilation with disk(radius) of flat packed planes (rows of nw words, margins >= radius).

    Horizontal dilations by each distinct half-width of the disk are built by repeated shift-ORs
    ([-a, a] (+) {-d, 0, d} = [-(a+d), a+d] for d <= 2a+1), then row dy of the disk ORs in the half-width
    w(|dy|) dilation shifted by dy rows.
    """
    if radius == 0:
        return x.copy()
    widths = _disk_half_widths(radius)
    horiz: dict[int, np.ndarray] = {0: x}
    cur, a = x, 0
    for w in sorted(set(widths)):
        while a < w:
            d = min(w - a, 2 * a + 1, 63)
            cur = cur | _shift_up(cur, d) | _shift_down(cur, d)
            a += d
        horiz[w] = cur
    out = horiz[widths[0]].copy()
    for dy in range(1, radius + 1):
        src, k = horiz[widths[dy]], dy * nw
        out[:-k] |= src[k:]  # content of row y + dy reaches row y
        out[k:] |= src[:-k]  # content of row y - dy reaches row y
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits per plane: (..., R, NW) uint64 -> (...,) int64."""
    return np.bitwise_count(x).sum(axis=(-2, -1), dtype=np.int64)


class _BoundaryMatcher:
    """Per-frame boundary counts of nA "A" masks (predictions) against nB "B" masks (GT), in chunks of frames.

    For every frame ``add`` receives the frame's window and a writer that fills the (nA + nB, h+1, w+1) mask
    windows (``_extended`` crops). ``f_measure`` returns F for every (A, B) pair and frame from the counts
    |b(A)|, |b(B)|, |b(A) & dil(b(B))| and |b(B) & dil(b(A))|; frames never added have no boundary at all.
    """

    def __init__(self, n_a: int, n_b: int, n_frames: int, radius: int):
        self.n_a, self.n_b, self.radius = n_a, n_b, radius
        self.margin = max(radius, 1)
        self.count_a = np.zeros((n_a, n_frames), np.int64)
        self.count_b = np.zeros((n_b, n_frames), np.int64)
        self.a_in_b = np.zeros((n_a, n_b, n_frames), np.int64)  # |b(A) & dil(b(B))|
        self.b_in_a = np.zeros((n_a, n_b, n_frames), np.int64)  # |b(B) & dil(b(A))|
        self._pending: list = []  # (frame, (h, w), writer)
        self._pending_bytes = 0

    def add(self, frame: int, shape: tuple[int, int], writer) -> None:
        """shape: the window's (h, w); writer(dst) fills dst (nA + nB, h+1, w+1) with the extended masks."""
        self._pending.append((frame, shape, writer))
        m = 2 * self.margin + 1
        self._pending_bytes += (self.n_a + self.n_b) * (shape[0] + m) * (shape[1] + m + 64)
        if self._pending_bytes > _CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        r, m, n = self.radius, self.margin, self.n_a + self.n_b
        frames = [f for f, _, _ in self._pending]
        hmax = max(hw[0] for _, hw, _ in self._pending)
        wmax = max(hw[1] for _, hw, _ in self._pending)
        rows = hmax + 1 + 2 * m
        bits = -(-(wmax + 1 + 2 * m) // 64) * 64
        nw = bits // 64
        buf = np.zeros((n, len(frames), rows, bits), bool)
        valid = np.zeros((len(frames), rows, bits), bool)
        for k, (_, (h, w), writer) in enumerate(self._pending):
            writer(buf[:, k, m : m + h + 1, m : m + w + 1])
            valid[k, m : m + h, m : m + w] = True
        self._pending, self._pending_bytes = [], 0
        masks = np.packbits(buf, axis=-1, bitorder="little").view(_U64).reshape(-1)
        del buf
        valid = np.packbits(valid, axis=-1, bitorder="little").view(_U64)
        shape = (n, len(frames), rows, nw)
        bounds = _packed_boundary(masks, nw).reshape(shape)
        bounds &= valid  # drop what the extra row/column and the virtual rows/columns outside the image produce
        counts = _popcount(bounds)  # (n, F)
        self.count_a[:, frames] = counts[: self.n_a]
        self.count_b[:, frames] = counts[self.n_a :]
        dil = _dilate_packed(bounds.reshape(-1), r, nw).reshape(shape)
        for i in range(self.n_a):
            for j in range(self.n_b):
                self.a_in_b[i, j, frames] = _popcount(bounds[i] & dil[self.n_a + j])
                self.b_in_a[i, j, frames] = _popcount(bounds[self.n_a + j] & dil[i])

    def f_measure(self) -> np.ndarray:
        """F for every (A = prediction, B = GT) pair and frame: float64 (nA, nB, T)."""
        self.flush()
        n_fg = np.broadcast_to(self.count_a[:, None, :], self.a_in_b.shape)
        n_gt = np.broadcast_to(self.count_b[None, :, :], self.a_in_b.shape)
        return _f_from_counts(n_fg, n_gt, self.a_in_b, self.b_in_a)


def _f_from_counts(n_fg, n_gt, fg_match, gt_match) -> np.ndarray:
    """The toolkit's precision/recall/F from integer boundary counts (float64, same expressions)."""
    n_fg, n_gt = np.asarray(n_fg), np.asarray(n_gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = fg_match / n_fg.astype(np.float64)
        recall = gt_match / n_gt.astype(np.float64)
    fg_empty, gt_empty = n_fg == 0, n_gt == 0
    precision = np.where(fg_empty, 1.0, np.where(gt_empty, 0.0, precision))
    recall = np.where(gt_empty, 1.0, np.where(fg_empty, 0.0, recall))
    denom = precision + recall
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * precision * recall / denom
    return np.where(denom == 0, 0.0, f)


def _single_object_jf(gt, pred, void, bound_th, name, need_j=True, need_f=True):
    """J and F per frame of one object: the shared pass of region_similarity / boundary_measure / jf_measures."""
    gt, pred, void = _check_stack(gt, pred, void, name)
    single = gt.ndim == 2
    if single:
        gt, pred = gt[None], pred[None]
        void = None if void is None else void[None]
    t, h, w = gt.shape
    inter = np.zeros(t, np.int64)
    union = np.zeros(t, np.int64)
    matcher = _BoundaryMatcher(1, 1, t, boundary_radius(h, w, bound_th)) if need_f else None
    for i in range(t):
        g, p = gt[i], pred[i]
        if void is not None:
            keep = ~void[i]
            g, p = g & keep, p & keep
        u = g | p
        win = _window(u)
        if win is None:
            continue
        if need_j:
            rows = slice(win.ymin, win.ymax + 1)
            inter[i] = np.count_nonzero(g[rows] & p[rows])
            union[i] = np.count_nonzero(u[rows])
        if need_f:
            pe, ge = _extended(p, win), _extended(g, win)

            def write(dst, pe=pe, ge=ge):
                dst[0] = pe
                dst[1] = ge

            matcher.add(i, (win.y1 - win.y0, win.x1 - win.x0), write)
    j = _j_from_counts(inter, union) if need_j else None
    f = matcher.f_measure()[0, 0] if need_f else None
    if single:
        j = None if j is None else float(j[0])
        f = None if f is None else float(f[0])
    return j, f


def boundary_measure(gt, pred, void=None, bound_th: float = DEFAULT_BOUND_TH, *, name: str | None = None):
    """F per frame, as ``davis2017.metrics.db_eval_boundary(gt, pred, void, bound_th)``.

    gt, pred, void: (T, H, W) (or (H, W)) masks. Returns float64 (T,) (a float for 2-D input).
    """
    return _single_object_jf(gt, pred, void, bound_th, name, need_j=False)[1]


def jf_measures(gt, pred, void=None, bound_th: float = DEFAULT_BOUND_TH, *, name: str | None = None):
    """(J, F) per frame in one pass: ``region_similarity`` and ``boundary_measure`` of the same inputs."""
    return _single_object_jf(gt, pred, void, bound_th, name)


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------


def db_statistics(per_frame_values) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame J or F, as ``davis2017.utils.db_statistics``.

    mean = nanmean(x); recall = mean(x > 0.5); decay = nanmean(bin 0) - nanmean(bin 3), with 4 bins whose
    bounds are ids = round(linspace(1, N, 5) + 1e-10) - 1 (bin i = x[ids[i] : ids[i+1] + 1]).

    Toolkit quirk, kept on purpose: ``ids`` is cast to uint8, so from N = 256 frames on the bounds wrap around
    modulo 256 (at N = 256 already ``ids[4] + 1`` wraps to 0) and the decay is computed on the wrong frames,
    often an empty bin, giving NaN.
    """
    x = np.asarray(per_frame_values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"db_statistics needs a 1-D array of per-frame values, got shape {x.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(x)
        recall = np.nanmean(x > 0.5)
        ids = np.round(np.linspace(1, len(x), 5) + 1e-10) - 1
        ids = ids.astype(np.uint8)
        bins = [x[ids[i] : ids[i + 1] + 1] for i in range(4)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


# ----------------------------------------------------------------------------------------------------------------
# unsupervised protocol on label maps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class UnsupervisedResult:
    """Result of the toolkit's unsupervised evaluation of one sequence (n = number of GT objects).

    Rows follow the toolkit: row k pairs the k-th matched predicted id (increasing) with its GT object.
    """

    J: np.ndarray  # (n, T) per-frame J after matching
    F: np.ndarray  # (n, T)
    JM: np.ndarray  # (n,) per-object mean / recall / decay
    JR: np.ndarray
    JD: np.ndarray
    FM: np.ndarray
    FR: np.ndarray
    FD: np.ndarray
    pred_ids: np.ndarray  # (n,) matched predicted ids (1-based; ids beyond the predicted ones are empty masks)
    gt_ids: np.ndarray  # (n,) the GT object of each row (1-based)
    pairwise_J: np.ndarray = field(repr=False)  # (n_pred_padded, n_gt, T), all (predicted id, GT object) pairs
    pairwise_F: np.ndarray = field(repr=False)

    @property
    def n_objects(self) -> int:
        return int(self.J.shape[0])


def _check_labels(gt_labels, pred_labels, name):
    where = f" for sequence {name!r}" if name else ""
    gt = np.asarray(gt_labels)
    pred = np.asarray(pred_labels)
    if gt.ndim != 3:
        raise ValueError(f"gt_labels must be a (T, H, W) label map, got shape {gt.shape}{where}")
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch of gt_labels {gt.shape} and pred_labels {pred.shape}{where}")
    for what, a in (("gt_labels", gt), ("pred_labels", pred)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{what} must hold integer labels, got dtype {a.dtype}{where}")
        if a.size and a.min() < 0:
            raise ValueError(f"{what} has negative labels{where}")
    return gt, pred


def evaluate_unsupervised(
    gt_labels,
    pred_labels,
    *,
    max_ids: int = MAX_PROPOSALS,
    bound_th: float = DEFAULT_BOUND_TH,
    void_label: int = 255,
    name: str | None = None,
) -> UnsupervisedResult:
    """The toolkit's ``DAVISEvaluation._evaluate_unsupervised`` for one sequence, from label maps.

    gt_labels: (T, H, W) integer GT label map (0 background, 1..K objects, ``void_label`` void).
    pred_labels: (T, H, W) integer predicted label map (0 background, 1..M predicted ids).

    - GT objects are 1..max label of the first GT frame (void removed); later new ids are not objects.
    - Predicted ids are 1..max predicted label over all frames; more than ``max_ids`` is an error (the toolkit
      exits). Missing ids, and ids up to the GT count when fewer are predicted, are empty masks.
    - Void pixels are removed from the GT objects and passed as void to J and F.
    - J and F are computed for every (predicted id, GT object) pair; ids are matched to objects with
      ``linear_sum_assignment(-mean_t((J + F) / 2))``. Every frame is scored (first and last included).
    """
    gt, pred = _check_labels(gt_labels, pred_labels, name)
    where = f" in sequence {name!r}" if name else ""
    t, h, w = gt.shape
    void = gt == void_label
    first = gt[0][~void[0]]
    n_gt = int(first.max()) if first.size else 0
    n_pred = int(pred.max()) if pred.size else 0
    if n_pred > max_ids:
        raise ValueError(
            f"predicted label map has id {n_pred}{where}, above the maximum number of proposals ({max_ids})"
        )
    n_res = max(n_pred, n_gt)
    radius = boundary_radius(h, w, bound_th)

    inter = np.zeros((n_res, n_gt, t), np.int64)
    size_p = np.zeros((n_res, t), np.int64)
    size_g = np.zeros((n_gt, t), np.int64)
    matcher = _BoundaryMatcher(n_res, n_gt, t, radius)
    for i in range(t):
        keep = ~void[i]
        g_lab = np.where(keep & (gt[i] <= n_gt), gt[i], 0)  # void and later objects -> background
        p_lab = np.where(keep, pred[i], 0)
        win = _window((g_lab > 0) | (p_lab > 0))
        if win is None:
            continue
        # J counts from the confusion of the two label maps inside the window (outside it both are 0)
        gw = g_lab[win.y0 : win.y1, win.x0 : win.x1].astype(np.int64)
        pw = p_lab[win.y0 : win.y1, win.x0 : win.x1].astype(np.int64)
        conf = np.bincount((pw * (n_gt + 1) + gw).ravel(), minlength=(n_res + 1) * (n_gt + 1))
        conf = conf.reshape(n_res + 1, n_gt + 1)
        inter[:, :, i] = conf[1:, 1:]
        size_p[:, i] = conf[1:, :].sum(axis=1)
        size_g[:, i] = conf[:, 1:].sum(axis=0)
        # boundaries of every predicted id and GT object on the common window
        g_ext, p_ext = _extended(g_lab, win), _extended(p_lab, win)

        def write(dst, g_ext=g_ext, p_ext=p_ext):
            for k in range(n_res):
                np.equal(p_ext, k + 1, out=dst[k])
            for k in range(n_gt):
                np.equal(g_ext, k + 1, out=dst[n_res + k])

        matcher.add(i, (win.y1 - win.y0, win.x1 - win.x0), write)
    union = size_p[:, None, :] + size_g[None, :, :] - inter
    pair_j = _j_from_counts(inter, union)  # (n_res, n_gt, T)
    pair_f = matcher.f_measure()
    if n_gt == 0:
        empty = np.zeros((0, t))
        z = np.zeros(0)
        return UnsupervisedResult(empty, empty.copy(), z, z, z, z, z, z, np.zeros(0, int), np.zeros(0, int),
                                  pair_j, pair_f)
    all_metrics = (np.mean(pair_j, axis=2) + np.mean(pair_f, axis=2)) / 2
    row_ind, col_ind = linear_sum_assignment(-all_metrics)
    j_rows = pair_j[row_ind, col_ind, :]
    f_rows = pair_f[row_ind, col_ind, :]
    js = np.array([db_statistics(r) for r in j_rows]).reshape(-1, 3)
    fs = np.array([db_statistics(r) for r in f_rows]).reshape(-1, 3)
    return UnsupervisedResult(
        J=j_rows, F=f_rows,
        JM=js[:, 0], JR=js[:, 1], JD=js[:, 2],
        FM=fs[:, 0], FR=fs[:, 1], FD=fs[:, 2],
        pred_ids=row_ind + 1, gt_ids=col_ind + 1,
        pairwise_J=pair_j, pairwise_F=pair_f,
    )


def global_table(results: Iterable[UnsupervisedResult]) -> np.ndarray:
    """The toolkit's global row (``eval_davis.py``) over sequences: float64 (7,) in ``GLOBAL_MEASURES`` order.

    Each column is the mean over all (sequence, GT object) pairs pooled, in sequence order;
    J&F-Mean = (J-Mean + F-Mean) / 2.
    """
    cols: dict[str, list[float]] = {k: [] for k in ("JM", "JR", "JD", "FM", "FR", "FD")}
    for res in results:
        for k in cols:
            cols[k].extend(getattr(res, k).tolist())
    if not cols["JM"]:
        raise ValueError("no GT objects in any sequence: the global table is undefined")
    jm, fm = np.mean(cols["JM"]), np.mean(cols["FM"])
    return np.array([(jm + fm) / 2.0, jm, np.mean(cols["JR"]), np.mean(cols["JD"]),
                     fm, np.mean(cols["FR"]), np.mean(cols["FD"])])


@dataclass
class RefDavisResult:
    """Ref-DAVIS17 evaluation: one toolkit run per annotator, then the mean over runs (the reported number)."""

    per_annotator: np.ndarray  # (A, 7) global rows, columns GLOBAL_MEASURES
    final: np.ndarray  # (7,) mean over annotators
    sequences: dict[str, list[UnsupervisedResult]]  # per sequence, one result per annotator

    def as_dict(self) -> dict[str, float]:
        """The final mean as {measure: value} (fractions in [0, 1])."""
        return {k: float(v) for k, v in zip(GLOBAL_MEASURES, self.final)}


def evaluate_ref_davis(
    videos: Mapping[str, tuple[np.ndarray, np.ndarray | Sequence[np.ndarray]]],
    *,
    bound_th: float = DEFAULT_BOUND_TH,
    max_ids: int = MAX_PROPOSALS,
) -> RefDavisResult:
    """Ref-DAVIS17 protocol: the unsupervised toolkit run once per annotator, global tables averaged.

    videos: {sequence: (gt_labels (T, H, W), pred_labels (A, T, H, W) or a list of A (T, H, W) maps)}, in the
    order the sequences are listed (ImageSets/2017/val.txt). Every video needs the same number A of annotator
    runs. Returns the (A, 7) per-annotator global table, its mean over annotators and the per-sequence results.
    """
    if not videos:
        raise ValueError("evaluate_ref_davis needs at least one video")
    n_ann = None
    per_seq: dict[str, list[UnsupervisedResult]] = {}
    for seq, (gt_labels, preds) in videos.items():
        preds = list(preds) if not isinstance(preds, np.ndarray) else [preds[k] for k in range(preds.shape[0])]
        if n_ann is None:
            n_ann = len(preds)
        if len(preds) != n_ann or n_ann == 0:
            raise ValueError(f"sequence {seq!r} has {len(preds)} annotator runs, expected {n_ann} (and at least 1)")
        per_seq[seq] = [
            evaluate_unsupervised(gt_labels, p, bound_th=bound_th, max_ids=max_ids, name=f"{seq} (annotator {k})")
            for k, p in enumerate(preds)
        ]
    rows = np.stack([global_table(res[k] for res in per_seq.values()) for k in range(n_ann)])
    return RefDavisResult(per_annotator=rows, final=np.mean(rows, axis=0), sequences=per_seq)
