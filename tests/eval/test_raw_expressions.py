"""Expressions reach the tokenizer exactly as written at Ref-YouTube-VOS and Ref-DAVIS17 inference (valid split,
local proxy, the pipeline stages), as the official inference feeds them; only the training loaders lower-case and
collapse whitespace. An expression without words is refused with the file and the expression named."""

import json
import random
import shutil
from types import SimpleNamespace

import pytest

from bifit.data.collate import tokenize
from bifit.data.davis import RefDavisDataset, ref_davis_videos
from bifit.data.ytvos import SampleError, YTVOSDataset, inference_expressions, inference_videos
from bifit.synthetic.config import SYNTHETIC_CATEGORIES, SyntheticConfig
from bifit.synthetic.ytvos import generate_benchmark
from tests.eval.fakes import BackgroundModel, WordTokenizer, prepared_ref_davis

RAW = "The  Red  Square"  # capitals and repeated spaces: normalising would change its tokens
NORMALISED = "the red square"


class RecordingTokenizer(WordTokenizer):
    """WordTokenizer that keeps every string it is given."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, captions, **kwargs):
        self.seen.extend(captions)
        return super().__call__(captions, **kwargs)


def set_first_expression(meta_path, text: str) -> None:
    """Replace expression "0" of every video of a meta_expressions.json by ``text``."""
    meta = json.loads(meta_path.read_text())
    for video in meta["videos"].values():
        video["expressions"]["0"]["exp"] = text
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def ytvos(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "ref-youtube-vos"
    generate_benchmark(SyntheticConfig(seed=5, num_train_videos=3, num_valid_videos=1, num_test_videos=1,
                                       frames_per_video=4, height=96, width=128), root, progress=False)
    for split in ("train", "valid"):
        set_first_expression(root / f"meta_expressions/{split}/meta_expressions.json", RAW)
    return root


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    _, prepared = prepared_ref_davis(tmp_path_factory.mktemp("raw_davis"), num_val_videos=1, frames_per_video=4)
    for split in ("train", "valid"):
        set_first_expression(prepared / f"meta_expressions/{split}/meta_expressions.json", RAW)
    return prepared


def test_tokenize_passes_the_text_as_given():
    tok = RecordingTokenizer()
    tokenize(tok, [RAW])
    assert tok.seen == [RAW]


def test_ytvos_valid_inference_tokenizes_the_raw_expression(ytvos, tmp_path):
    from bifit.eval.ytvos import evaluate_valid, inference_options, predict_valid

    assert RAW in [e.caption for e in inference_expressions(ytvos, "valid")]
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(ytvos), eval_short_side=32), train=SimpleNamespace(seed=0),
                          eval=SimpleNamespace(num_frames=0, threshold=0.5, batch_expressions=4, amp=False))
    tok = RecordingTokenizer()
    evaluate_valid(BackgroundModel(), tok, ytvos, seed=0, **inference_options(cfg))  # synthetic valid: local GT
    assert RAW in tok.seen and NORMALISED not in tok.seen
    tok = RecordingTokenizer()
    predict_valid(BackgroundModel(), tok, ytvos, tmp_path / "pred", expected_videos=len(inference_videos(ytvos)),
                  **inference_options(cfg))  # the real valid split's path: masks only
    assert RAW in tok.seen and NORMALISED not in tok.seen


def test_ytvos_proxy_tokenizes_the_raw_expression(ytvos):
    from bifit.eval.ytvos_proxy import evaluate_proxy, proxy_videos

    tok = RecordingTokenizer()
    evaluate_proxy(BackgroundModel(), tok, ytvos, proxy_videos(ytvos, 0.4), short_side=32, progress=False)
    assert RAW in tok.seen and NORMALISED not in tok.seen


def test_ytvos_training_loader_normalises(ytvos):
    ds = YTVOSDataset(ytvos, "train", 1, categories=SYNTHETIC_CATEGORIES, rng=random.Random(0))
    captions = {s.caption for s in ds.samples if s.exp_id == "0"}
    assert captions == {NORMALISED}
    first = next(i for i, s in enumerate(ds.samples) if s.exp_id == "0")
    assert ds[first][1]["caption"] == NORMALISED


def test_ytvos_inference_refuses_an_expression_without_words(ytvos, tmp_path):
    root = shutil.copytree(ytvos, tmp_path / "copy")
    meta_path = root / "meta_expressions/valid/meta_expressions.json"
    set_first_expression(meta_path, " \t ")
    with pytest.raises(SampleError, match=r"meta_expressions\.json: empty expression .*exp_id 0\]"):
        inference_expressions(root, "valid")


def test_ref_davis_inference_tokenizes_the_raw_expression(davis):
    from bifit.eval.ref_davis import evaluate_ref_davis_model

    assert ref_davis_videos(davis)[0].captions[0][0] == RAW
    tok = RecordingTokenizer()
    evaluate_ref_davis_model(BackgroundModel(), tok, davis, short_side=32, progress=False)
    assert RAW in tok.seen and NORMALISED not in tok.seen


def test_ref_davis_training_loader_normalises(davis):
    ds = RefDavisDataset(davis, "train", num_frames=1, rng=random.Random(0))
    assert {s.caption for s in ds.samples if s.exp_id == "0"} == {NORMALISED}


def test_ref_davis_refuses_an_expression_without_words(davis, tmp_path):
    root = shutil.copytree(davis, tmp_path / "copy")
    set_first_expression(root / "meta_expressions/valid/meta_expressions.json", "   ")
    with pytest.raises(ValueError, match=r"valid/meta_expressions\.json: sequence '\S+' exp_id 0: expected a "
                                         r"non-empty 'exp' string, got '   '"):
        ref_davis_videos(root)
