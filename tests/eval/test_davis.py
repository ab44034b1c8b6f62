"""DAVIS J / F: hand-computed cases, the toolkit's quirks, an independent restatement, and the golden file."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from bifit.eval import davis

# ----------------------------------------------------------------------------------------------------------------
# independent restatement of the davis2017 toolkit (per-frame loops, explicit shifts, dilation with scipy)
# ----------------------------------------------------------------------------------------------------------------


def toolkit_seg2bmap(seg):
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def toolkit_f(fg, gt, void=None, bound_th=0.008):
    void = np.zeros_like(fg, dtype=bool) if void is None else void.astype(bool)
    r = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fb, gb = toolkit_seg2bmap(fg * ~void), toolkit_seg2bmap(gt * ~void)
    offs = np.arange(-int(r), int(r) + 1)
    selem = offs[:, None] ** 2 + offs[None, :] ** 2 <= int(r) ** 2
    fd, gd = ndi.binary_dilation(fb, selem), ndi.binary_dilation(gb, selem)
    n_fg, n_gt = fb.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, rc = 1, 0
    elif n_fg > 0 and n_gt == 0:
        p, rc = 0, 1
    elif n_fg == 0 and n_gt == 0:
        p, rc = 1, 1
    else:
        p, rc = np.sum(fb & gd) / float(n_fg), np.sum(gb & fd) / float(n_gt)
    return 0 if p + rc == 0 else 2 * p * rc / (p + rc)


def toolkit_j(gt, pred, void=None):
    void = np.zeros_like(gt, dtype=bool) if void is None else void
    inter = np.sum((pred & gt) & ~void, axis=(-2, -1))
    union = np.sum((pred | gt) & ~void, axis=(-2, -1))
    j = inter / np.where(union == 0, 1, union)
    j[np.isclose(union, 0)] = 1
    return j


def random_masks(rng, t, h, w, p_empty=0.15):
    """Smooth random blobs, some touching borders, some thin, some empty frames."""
    out = np.zeros((t, h, w), bool)
    for i in range(t):
        if rng.random() < p_empty:
            continue
        noise = ndi.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(1.0, 4.0))
        out[i] = noise > rng.uniform(0.0, 0.3) * noise.std()
        if rng.random() < 0.3:
            out[i, rng.integers(h)] = True  # a 1-px line across the frame
    return out


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hw", "r"), [((480, 854), 8), ((360, 640), 6), ((480, 640), 7), ((720, 1280), 12),
                                       ((480, 910), 9)])
def test_boundary_radius_examples(hw, r):
    assert davis.boundary_radius(*hw) == r


def test_boundary_radius_in_pixels_and_invalid():
    assert davis.boundary_radius(100, 100, bound_th=3) == 3
    with pytest.raises(ValueError, match="whole number"):
        davis.boundary_radius(100, 100, bound_th=2.5)
    with pytest.raises(ValueError, match="positive"):
        davis.boundary_radius(100, 100, bound_th=0)


def test_disk_is_skimage_disk():
    assert davis.disk(1).sum() == 5
    assert davis.disk(2).sum() == 13
    assert davis.disk(8).sum() == 197  # Gauss circle count N(8)
    d = davis.disk(3)
    assert d.shape == (7, 7) and d[3, 0] and d[0, 3] and not d[0, 2] and d[1, 1]


def test_seg2bmap_single_pixel_is_offset_towards_origin():
    seg = np.zeros((4, 4), bool)
    seg[1, 1] = True
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:2] = True
    np.testing.assert_array_equal(davis.seg2bmap(seg), expected)


def test_seg2bmap_border_is_never_a_boundary():
    assert not davis.seg2bmap(np.ones((5, 7), bool)).any()
    left_half = np.zeros((8, 10), bool)
    left_half[:, :5] = True  # touches the top, left and bottom borders
    b = davis.seg2bmap(left_half)
    assert b.sum() == 8 and b[:, 4].all()  # only the inner edge, column 4
    # a block touching the right border: the last column only compares downward
    seg = np.zeros((4, 4), bool)
    seg[1:3, 2:4] = True
    b = davis.seg2bmap(seg)
    assert b[0, 3] and not b[1, 3] and b[2, 3] and not b[3, 3]


def test_seg2bmap_matches_toolkit_on_random_masks():
    rng = np.random.default_rng(0)
    for seg in random_masks(rng, 20, 23, 31):
        np.testing.assert_array_equal(davis.seg2bmap(seg), toolkit_seg2bmap(seg))


# ----------------------------------------------------------------------------------------------------------------
# J
# ----------------------------------------------------------------------------------------------------------------


def test_region_similarity_hand_cases():
    gt = np.zeros((5, 4, 4), bool)
    pred = np.zeros((5, 4, 4), bool)
    void = np.zeros((5, 4, 4), bool)
    gt[0, 0:2, 0:2] = True
    pred[0, 0:2, 1:3] = True  # inter 2, union 6
    gt[1], pred[1] = gt[0], pred[0]
    void[1, :, 2] = True  # column 2 void: inter 2, union 4
    # frame 2: both empty -> 1
    gt[3, 1:3, 1:3] = True  # frame 3: pred empty -> 0
    gt[4, 0, 0] = pred[4, 3, 3] = True
    void[4, 0, 0] = void[4, 3, 3] = True  # frame 4: everything inside the void -> union 0 -> 1
    np.testing.assert_array_equal(davis.region_similarity(gt, pred, void), [1 / 3, 0.5, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(davis.region_similarity(gt, pred), [1 / 3, 1 / 3, 1.0, 0.0, 0.0])
    assert davis.region_similarity(gt[0], pred[0]) == pytest.approx(1 / 3)


def test_region_similarity_matches_toolkit():
    rng = np.random.default_rng(1)
    gt, pred = random_masks(rng, 12, 40, 57), random_masks(rng, 12, 40, 57)
    void = random_masks(rng, 12, 40, 57, p_empty=0.5) & (rng.random((12, 40, 57)) < 0.3)
    np.testing.assert_array_equal(davis.region_similarity(gt, pred, void), toolkit_j(gt, pred, void))
    np.testing.assert_array_equal(davis.region_similarity(gt, pred), toolkit_j(gt, pred))


def test_shape_errors_name_the_sequence():
    with pytest.raises(ValueError, match=r"shape mismatch of gt \(2, 4, 4\) and pred \(2, 4, 5\).*'seqX'"):
        davis.region_similarity(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), name="seqX")
    with pytest.raises(ValueError, match="void"):
        davis.boundary_measure(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        davis.boundary_measure(np.zeros(4), np.zeros(4))


# ----------------------------------------------------------------------------------------------------------------
# F
# ----------------------------------------------------------------------------------------------------------------


def test_boundary_measure_empty_cases():
    h, w = 30, 40
    blob = np.zeros((h, w), bool)
    blob[10:20, 10:25] = True
    empty = np.zeros((h, w), bool)
    gt = np.stack([empty, empty, blob, blob])
    pred = np.stack([empty, blob, empty, blob])
    np.testing.assert_array_equal(davis.boundary_measure(gt, pred), [1.0, 0.0, 0.0, 1.0])


def test_boundary_measure_full_frame_has_no_boundary():
    full = np.ones((20, 30), bool)
    blob = np.zeros((20, 30), bool)
    blob[5:10, 5:10] = True
    assert davis.boundary_measure(full, full) == 1.0  # both boundaries empty
    assert davis.boundary_measure(full, blob) == 0.0  # GT boundary empty, prediction's not
    assert davis.region_similarity(full, blob) == pytest.approx(25 / 600)


def test_boundary_measure_vertical_bars_hand_computed():
    # GT: column 5 of an 8x10 frame (boundary: columns 4 and 5, 8 px each); prediction: column 7 (columns 6, 7)
    gt = np.zeros((8, 10), bool)
    pred = np.zeros((8, 10), bool)
    gt[:, 5] = True
    pred[:, 7] = True
    assert davis.seg2bmap(gt).sum() == 16
    # radius 1: column 6 is within 1 of column 5 and vice versa -> P = R = 1/2 -> F = 1/2
    assert davis.boundary_measure(gt, pred, bound_th=1) == 0.5
    assert davis.boundary_measure(gt, pred, bound_th=2) == 1.0
    # the radius from bound_th: ceil(0.1 * hypot(8, 10)) = 2
    assert davis.boundary_measure(gt, pred, bound_th=0.1) == 1.0


def test_boundary_measure_void_edge_creates_boundary():
    # the masks are cut by the void before the boundary maps: the void edge becomes a boundary
    gt = np.zeros((1, 20, 20), bool)
    gt[0, 5:15, 5:15] = True
    pred = gt.copy()
    void = np.zeros_like(gt)
    void[0, :, 10:] = True
    assert davis.boundary_measure(gt, pred, void)[0] == 1.0
    pred2 = gt.copy()
    pred2[0, 5:15, 12:15] = False  # differs only inside the void
    assert davis.boundary_measure(gt, pred2, void)[0] == 1.0
    assert davis.boundary_measure(gt, pred2, None, bound_th=1)[0] < 1.0


@pytest.mark.parametrize(("t", "h", "w", "bound_th"), [(10, 48, 64, 0.008), (6, 37, 101, 0.05), (8, 64, 48, 3),
                                                       (4, 130, 70, 1)])
def test_boundary_measure_matches_toolkit(t, h, w, bound_th):
    rng = np.random.default_rng(t * 1000 + h)
    gt, pred = random_masks(rng, t, h, w), random_masks(rng, t, h, w)
    pred[0] = gt[0]  # pred == gt
    void = random_masks(rng, t, h, w, p_empty=0.5) & (rng.random((t, h, w)) < 0.5)
    for v in (None, void):
        expected = [toolkit_f(pred[i], gt[i], None if v is None else v[i], bound_th) for i in range(t)]
        np.testing.assert_array_equal(davis.boundary_measure(gt, pred, v, bound_th), expected)
        j, f = davis.jf_measures(gt, pred, v, bound_th)
        np.testing.assert_array_equal(f, expected)
        np.testing.assert_array_equal(j, toolkit_j(gt, pred, v))


def test_boundary_measure_chunking_does_not_change_values(monkeypatch):
    rng = np.random.default_rng(3)
    gt, pred = random_masks(rng, 9, 60, 90), random_masks(rng, 9, 60, 90)
    whole = davis.boundary_measure(gt, pred)
    monkeypatch.setattr(davis, "_CHUNK_BYTES", 1)  # one frame per chunk
    np.testing.assert_array_equal(davis.boundary_measure(gt, pred), whole)


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------


def test_db_statistics_hand_computed():
    x = np.array([1, 1, 0, 0, 0.6, 0.4, 1, 0])
    mean, recall, decay = davis.db_statistics(x)
    assert mean == 0.5
    assert recall == 0.5  # strict > 0.5
    # bins: ids = round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7]; bin 0 = x[0:3], bin 3 = x[5:8]
    assert decay == pytest.approx(2 / 3 - 1.4 / 3)
    assert davis.db_statistics([0.7]) == (0.7, 1.0, 0.0)


def test_db_statistics_uint8_quirk_beyond_256_frames():
    # the toolkit casts the bin bounds to uint8: with 256 frames the last bound is 255 and ids[4] + 1 wraps to
    # 0 (bin 3 = x[191:0] is empty -> NaN); beyond, the bounds themselves wrap
    assert davis.db_statistics(np.linspace(1, 0, 255))[2] == pytest.approx(np.mean(np.linspace(1, 0, 255)[:65])
                                                                         - np.mean(np.linspace(1, 0, 255)[191:]))
    assert np.isnan(davis.db_statistics(np.linspace(1, 0, 256))[2])
    assert np.isnan(davis.db_statistics(np.linspace(1, 0, 300))[2])


# ----------------------------------------------------------------------------------------------------------------
# unsupervised protocol, Ref-DAVIS averaging
# ----------------------------------------------------------------------------------------------------------------


def two_object_video(t=6, h=40, w=60):
    gt = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        gt[i, 5:20, 5 + i : 20 + i] = 1
        gt[i, 22:35, 30:50] = 2
    gt[:, 19:23, :] = np.where(gt[:, 19:23, :] == 0, 255, gt[:, 19:23, :])  # a void band
    return gt


def test_unsupervised_perfect_and_swapped_ids():
    gt = two_object_video()
    pred = np.where(gt == 255, 0, gt)
    res = davis.evaluate_unsupervised(gt, pred)
    np.testing.assert_array_equal(res.J, 1.0)
    np.testing.assert_array_equal(res.F, 1.0)
    assert res.pred_ids.tolist() == [1, 2] and res.gt_ids.tolist() == [1, 2]
    swapped = np.choose(pred, [0, 2, 1]).astype(np.uint8)
    res2 = davis.evaluate_unsupervised(gt, swapped)
    np.testing.assert_array_equal(res2.JM, [1.0, 1.0])  # Hungarian matching: swapped ids are not penalised
    assert res2.pred_ids.tolist() == [1, 2] and res2.gt_ids.tolist() == [2, 1]


def test_unsupervised_missing_ids_are_empty_and_extra_ids_allowed():
    gt = two_object_video()
    pred = np.where(gt == 1, 1, 0).astype(np.uint8)  # object 2 never predicted
    res = davis.evaluate_unsupervised(gt, pred)
    np.testing.assert_array_equal(res.JM, [1.0, 0.0])
    np.testing.assert_array_equal(res.FM, [1.0, 0.0])
    pred3 = np.where(gt == 255, 0, gt).astype(np.uint8)
    pred3[:, 0:3, 0:3] = 3  # an extra id
    res3 = davis.evaluate_unsupervised(gt, pred3)
    assert res3.n_objects == 2 and res3.pairwise_J.shape == (3, 2, 6)
    np.testing.assert_array_equal(res3.JM, [1.0, 1.0])


def test_unsupervised_object_count_from_first_frame_and_limits():
    gt = two_object_video()
    gt[0][gt[0] == 2] = 0  # object 2 absent from the first frame: only object 1 is scored
    res = davis.evaluate_unsupervised(gt, np.where(gt == 255, 0, gt).astype(np.uint8))
    assert res.n_objects == 1 and res.J.shape == (1, 6)
    too_many = np.zeros_like(gt)
    too_many[0, 0, 0] = 21
    with pytest.raises(ValueError, match=r"id 21 in sequence 'vid'.*maximum number of proposals \(20\)"):
        davis.evaluate_unsupervised(gt, too_many, name="vid")
    empty_gt = np.zeros_like(gt)
    assert davis.evaluate_unsupervised(empty_gt, too_many, max_ids=30).n_objects == 0


def test_unsupervised_pairs_match_single_object_measures():
    rng = np.random.default_rng(7)
    t, h, w = 5, 50, 70
    gt = np.zeros((t, h, w), np.uint8)
    pred = np.zeros((t, h, w), np.uint8)
    for k in (1, 2, 3):
        gt[random_masks(rng, t, h, w, p_empty=0.0) & (rng.random((t, h, w)) < 0.9)] = k
        pred[random_masks(rng, t, h, w, p_empty=0.2)] = k
    gt[:, 10:12, :] = 255
    res = davis.evaluate_unsupervised(gt, pred)
    void = gt == 255
    for i in range(res.pairwise_J.shape[0]):
        for j in range(res.pairwise_J.shape[1]):
            g, p = gt == j + 1, pred == i + 1
            np.testing.assert_array_equal(res.pairwise_J[i, j], davis.region_similarity(g, p, void))
            np.testing.assert_array_equal(res.pairwise_F[i, j], davis.boundary_measure(g, p, void))
            np.testing.assert_array_equal(res.pairwise_F[i, j],
                                          [toolkit_f(p[f], g[f], void[f]) for f in range(t)])


def test_ref_davis_averages_annotator_tables():
    gt = two_object_video()
    perfect = np.where(gt == 255, 0, gt).astype(np.uint8)
    half = np.where(gt == 1, 1, 0).astype(np.uint8)
    res = davis.evaluate_ref_davis({"v1": (gt, np.stack([perfect, half])), "v2": (gt, [perfect, perfect])})
    assert res.per_annotator.shape == (2, 7)
    np.testing.assert_array_equal(res.per_annotator[0], [1, 1, 1, 0, 1, 1, 0])
    # annotator 1: objects (1, 2) of v1 score (1, 0), both objects of v2 score 1 -> means 3/4
    assert res.per_annotator[1, 1] == 0.75 and res.per_annotator[1, 4] == 0.75 and res.per_annotator[1, 0] == 0.75
    np.testing.assert_allclose(res.final, res.per_annotator.mean(axis=0))
    assert res.as_dict()["J&F-Mean"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="annotator runs"):
        davis.evaluate_ref_davis({"v1": (gt, [perfect]), "v2": (gt, [perfect, perfect])})


# ----------------------------------------------------------------------------------------------------------------
# golden file (official toolkit outputs)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "davis_metrics_public.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_golden_per_frame(golden):
    bound_th = float(golden["bound_th"])
    for s in golden["seq_names"]:
        gt, pred, void = golden[f"{s}__gt"], golden[f"{s}__pred"], golden[f"{s}__void"]
        j, f = davis.jf_measures(gt, pred, void, bound_th)
        np.testing.assert_allclose(j, golden[f"{s}__J"], rtol=0, atol=1e-12, err_msg=s)
        np.testing.assert_allclose(f, golden[f"{s}__F"], rtol=0, atol=1e-12, err_msg=s)
        np.testing.assert_allclose(davis.region_similarity(gt, pred), golden[f"{s}__J_novoid"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(davis.boundary_measure(gt, pred, None, bound_th), golden[f"{s}__F_novoid"],
                                   rtol=0, atol=1e-12)
        stats = [*davis.db_statistics(j), *davis.db_statistics(f)]
        np.testing.assert_allclose(stats, golden[f"{s}__stats_JF"], rtol=0, atol=1e-12, err_msg=s)
        assert davis.boundary_radius(*gt.shape[1:], bound_th) == golden[f"{s}__bound_pix"]


def test_golden_end_to_end(golden):
    videos = {v: (golden[f"e2e_{v}__gt_labels"], golden[f"e2e_{v}__pred_labels"]) for v in golden["e2e_videos"]}
    res = davis.evaluate_ref_davis(videos, bound_th=float(golden["bound_th"]))
    np.testing.assert_allclose(res.per_annotator, golden["e2e_global"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.final, golden["e2e_final_mean_over_annotators"], rtol=0, atol=1e-12)
    for v in videos:
        for k, r in enumerate(res.sequences[v]):
            for q in ("J", "F", "JM", "FM"):
                np.testing.assert_allclose(getattr(r, q), golden[f"e2e_{v}__{q}"][k], rtol=0, atol=1e-12)
    assert res.sequences["vidB"][0].n_objects == 2  # object 3 appears after the first frame
