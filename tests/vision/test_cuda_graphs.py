"""The CUDA graph path of the Inspector (vision.cuda_graphs) and the unchanged CPU path.

Everything except the capture itself runs on a CPU: the runner with ``capture=False`` uses the same
buckets, static buffers, padding and host copies as with graphs, and an Inspector whose graphs are
built that way goes through the same packing, chunking and forward-hook calls as on a GPU. The
tests marked for CUDA capture real graphs and compare them with the eager path.
"""

from __future__ import annotations

import copy
from functools import partial

import cv2
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lineinspect.errors import LineInspectError
from lineinspect.images import decode_image, encode_jpeg, encode_png
from lineinspect.service.describe import EvidenceTap
from lineinspect.training.train_language import evidence_config_for
from lineinspect.vision import inspector as inspector_module
from lineinspect.vision.cuda_graphs import (
    CudaGraphRunner,
    bucket_for,
    cat_rows,
    copy_rows,
    inference_copy,
    split_batch,
)
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig, DefectOutput
from lineinspect.vision.device_jpeg import DeviceJpegDecoder
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration, Inspector, calibrated_map, calibrated_score
from lineinspect.vision.preprocess import frames_into, resize_mode, resize_weights, to_batch
from lineinspect.vision.ridges import ridge_features, ridge_kernels

SIZE = 64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(num_classes: int = 3) -> DefectModel:
    torch.manual_seed(0)
    return DefectModel(DefectModelConfig(preset("tiny", img_size=SIZE), HeadConfig(num_classes=num_classes),
                                         memory_bank_size=32)).eval()


def frames(n: int, shape: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def graphs_on_cpu(inspector: Inspector, monkeypatch: pytest.MonkeyPatch) -> Inspector:
    """The Inspector's graph path with the runner's buffers and copies but no capture (CPU)."""
    monkeypatch.setattr(inspector_module, "CudaGraphRunner", partial(CudaGraphRunner, capture=False))
    inspector.graphs = inspector._capture_graphs()
    return inspector


# --------------------------------------------------------------------------- buckets and batches


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32), (33, 64), (64, 64)])
def test_smallest_bucket_that_holds_the_batch(n: int, bucket: int) -> None:
    assert bucket_for(n, (1, 2, 4, 8, 16, 32, 64)) == bucket


def test_batch_beyond_the_largest_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(65, (1, 2, 4, 8, 16, 32, 64))


def test_split_batch_covers_every_item_once() -> None:
    assert split_batch(130, 64) == [slice(0, 64), slice(64, 128), slice(128, 130)]
    assert split_batch(64, 64) == [slice(0, 64)]
    assert split_batch(0, 64) == []


def test_copy_and_cat_rows_of_named_tuples() -> None:
    out = DefectOutput(*(torch.arange(8.0).view(4, 2) if i != 3 else None for i in range(8)))
    first = copy_rows(out, 3)
    assert first.anomaly_map.shape == (3, 2) and first.memory_map is None
    out.anomaly_map.zero_()  # the copy owns its memory
    assert float(first.anomaly_map.sum()) > 0
    both = cat_rows([first, copy_rows(first, 1)])
    assert both.image_prob.shape == (4, 2) and both.memory_map is None


# --------------------------------------------------------------------------- GPU-side preprocessing


@pytest.mark.parametrize("shape", [(480, 640), (2 * SIZE, 2 * SIZE), (SIZE, 3 * SIZE), (30, 40), (SIZE, 20),
                                   (100, 40), (40, 100)])
def test_resize_weights_are_opencvs_filters(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).random((*shape, 3)).astype(np.float32)
    shrink = shape[0] > SIZE or shape[1] > SIZE
    expected = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    mode = resize_mode(*shape, SIZE)
    got = np.einsum("sh,hwc->swc", resize_weights(shape[0], SIZE, mode), image)
    got = np.einsum("swc,tw->stc", got, resize_weights(shape[1], SIZE, mode))
    assert np.abs(got - expected).max() < 1e-5


def test_frames_into_matches_the_eager_preprocessing() -> None:
    images = frames(2, (240, 320)) + frames(1, (40, 30), seed=1) + frames(1, (SIZE, SIZE), seed=2)
    out = torch.zeros(5, 3, SIZE, SIZE)
    frames_into(images, out)
    reference = to_batch(images, SIZE, torch.device("cpu"))  # OpenCV on uint8: rounded to whole levels
    assert (out[:2] - reference[:2]).abs().max() <= 0.5 / 255 + 1e-6  # area: exact before rounding
    assert (out[2] - reference[2]).abs().max() <= 1 / 255  # bilinear: OpenCV's fixed-point weights
    assert torch.equal(out[3], reference[3])  # already at model size: untouched
    assert float(out[4].abs().sum()) == 0  # rows after the batch are left alone


def test_frames_into_keeps_the_order_of_mixed_sizes() -> None:
    a, b = frames(2, (SIZE, SIZE)), frames(1, (2 * SIZE, 2 * SIZE), seed=1)
    out = torch.zeros(3, 3, SIZE, SIZE)
    frames_into([a[0], b[0], a[1]], out)  # the two SIZE frames are not neighbours in the batch
    for row, image in ((0, a[0]), (2, a[1])):
        assert torch.equal(out[row], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    shrunk = cv2.resize(b[0], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert (out[1] - torch.from_numpy(shrunk).permute(2, 0, 1).float() / 255).abs().max() <= 0.5 / 255 + 1e-6


def test_frames_already_on_the_device_skip_the_host_and_match_host_frames() -> None:
    host = frames(2, (240, 320)) + frames(1, (SIZE, SIZE), seed=1)
    on_device = [torch.from_numpy(im.transpose(2, 0, 1).copy()).permute(1, 2, 0) for im in host]  # as nvJPEG gives
    expected, got = torch.zeros(3, 3, SIZE, SIZE), torch.zeros(3, 3, SIZE, SIZE)
    frames_into(host, expected)
    frames_into([on_device[0], host[1], on_device[2]], got)  # mixed in one batch, in order
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(to_batch(on_device, SIZE, torch.device("cpu")), to_batch(host, SIZE, torch.device("cpu")))


# --------------------------------------------------------------------------- the runner


def mean_rows(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images.mean((2, 3)), images.amax((1, 2, 3))


def test_runner_pads_to_buckets_and_returns_only_the_batch() -> None:
    runner = CudaGraphRunner(mean_rows, SIZE, torch.device("cpu"), buckets=(4, 1, 2, 4), capture=False)
    assert runner.buckets == (1, 2, 4) and runner.max_batch == 4
    runner.run(frames(4, seed=5))  # leaves other frames in the padding rows of bucket 4
    images = frames(3)
    result = runner.run(images, keep=True)
    expected = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float().mean((1, 2)) / 255 for im in images])
    assert result.rows.shape == (3, 3) and np.allclose(result.rows, expected.numpy(), atol=1e-6)
    assert result.images.shape == (3, 3, SIZE, SIZE) and result.extra.shape == (3,)
    runner.run(frames(4, seed=6))  # overwrites the static buffers...
    assert torch.allclose(result.images.mean((2, 3)), expected)  # ...but not what an earlier run kept
    assert runner.run(images[:1]).images is None  # nothing kept unless asked


def test_runner_refuses_capture_on_a_device_that_is_not_cuda() -> None:
    with pytest.raises(LineInspectError, match="CUDA"):
        CudaGraphRunner(mean_rows, SIZE, torch.device("cpu"))


def test_inference_copy_keeps_the_memory_banks_in_fp32() -> None:
    model = small_model()
    with torch.no_grad():
        model.memory.fit(torch.randn(100, model.memory.bank.shape[1]))
        model.regions.fit(torch.rand(12, 3, SIZE, SIZE))
    twin = inference_copy(model, torch.bfloat16)
    assert twin.regions.ready and twin.regions.bank.dtype == torch.float32
    assert torch.equal(twin.regions.bank, model.regions.bank)
    assert torch.equal(twin.regions.quantiles, model.regions.quantiles)  # not saved, so not in the state dict
    assert twin.encoder.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert twin.head.stem.s2[0][1].running_var.dtype == torch.bfloat16
    assert twin.memory.bank.dtype == torch.float32 and torch.equal(twin.memory.bank, model.memory.bank)
    assert bool(twin.memory.fitted) and not any(p.requires_grad for p in twin.parameters())
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched


def test_bank_fitted_skips_the_device_read() -> None:
    model = small_model()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        desc, _ = model.descriptors(x)
        model.memory.fit(desc.flatten(0, 1))
        read = model(x)
        told = model(x, bank_fitted=True)
        assert model(x, bank_fitted=False).memory_map is None
    assert torch.equal(read.memory_map, told.memory_map)


# --------------------------------------------------------------------------- the Inspector


def test_cpu_inspector_is_the_eager_path() -> None:
    model = small_model(num_classes=0)
    inspector = Inspector(model, Calibration(), "cpu", precision="fp32")  # cuda_graphs defaults to True
    assert inspector.graphs is None and inspector.info()["cuda_graphs"] == []
    image = frames(1, (90, 120))[0]
    resized = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    with torch.no_grad():
        out = model(torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255)
    result = inspector.inspect_batch([image], heatmaps=True)[0]
    assert result.score == pytest.approx(float(0.5 * (out.map_score + out.image_prob)[0]), abs=1e-6)
    expected = cv2.resize(out.anomaly_map[0, 0].numpy(), (120, 90), interpolation=cv2.INTER_LINEAR)
    assert np.allclose(result.heatmap, expected, atol=1e-6)


@pytest.mark.parametrize(("score_source", "map_source"),
                         [("head", "head"), ("fused", "fused"), ("regions", "head"), ("head", "fused")])
def test_graph_path_matches_eager_path(monkeypatch: pytest.MonkeyPatch, score_source: str, map_source: str) -> None:
    model = small_model()
    if (score_source, map_source) != ("head", "head"):  # the bank, region statistics and novelty go through graphs
        with torch.no_grad():
            good = torch.rand(4, 3, SIZE, SIZE)
            desc, _ = model.descriptors(good)
            model.memory.fit(desc.flatten(0, 1))
            model.regions.fit(good)
    cal = Calibration(score_source=score_source, map_source=map_source, threshold=0.5, pixel_threshold=0.5,
                      class_names=("a", "b", "c"))
    eager = Inspector(model, cal, "cpu", precision="fp32")
    graphed = graphs_on_cpu(Inspector(model, cal, "cpu", precision="fp32", buckets=(1, 2, 4)), monkeypatch)
    images = frames(7)  # two chunks: 4 + 3 (bucket 4, one padding row)
    expected, got = eager.inspect_batch(images, heatmaps=True), graphed.inspect_batch(images, heatmaps=True)
    for e, g in zip(expected, got, strict=True):
        assert g.score == pytest.approx(e.score, abs=1e-4)
        assert g.is_defect == e.is_defect and g.defect_class == e.defect_class
        assert g.class_prob == pytest.approx(e.class_prob, abs=1e-4)
        assert np.allclose(g.heatmap, e.heatmap, atol=1e-4)
        assert [(b.x0, b.y0, b.x1, b.y1) for b in g.boxes] == [(b.x0, b.y0, b.x1, b.y1) for b in e.boxes]
        assert set(g.timings_ms) == {"model", "post"}


def test_bf16_graph_path_reads_the_region_statistics_as_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 copy that the graphs run sees fp32 frames and fp32 quantile levels (an unsaved buffer): the
    statistics of uint8-like goods are narrow, so rounding either moved region scores by 0.2-3 standard deviations."""
    model = small_model()
    with torch.no_grad():
        good = torch.from_numpy(np.stack(frames(8, seed=3))).permute(0, 3, 1, 2).float() / 255
        desc, _ = model.descriptors(good)
        model.memory.fit(desc.flatten(0, 1))
        model.regions.fit(good)
    cal = Calibration(score_source="fused", map_source="fused")
    eager = Inspector(model, cal, "cpu", precision="bf16")
    graphed = graphs_on_cpu(Inspector(model, cal, "cpu", precision="bf16", buckets=(1, 2, 4)), monkeypatch)
    images = frames(4)
    expected = eager.run_model(to_batch(images, SIZE, torch.device("cpu")))
    got = graphed.graphs.run(images, keep=True).extra
    assert torch.equal(got.region_score, expected.region_score) and torch.equal(got.region_map, expected.region_map)
    for e, g in zip(eager.inspect_batch(images), graphed.inspect_batch(images), strict=True):
        assert g.score == pytest.approx(e.score, abs=0.01)


class HostTensorSpy(TorchDispatchMode):
    """Records tensors made from host data (torch.tensor of Python values): on a GPU each is a copy from the host,
    which CUDA-graph capture refuses. The CPU tests emulate the graphs, so this is how they see such a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.made += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_the_graphed_computation_makes_no_tensors_from_host_data() -> None:
    model = small_model()
    with torch.no_grad():
        good = torch.rand(4, 3, SIZE, SIZE)
        desc, _ = model.descriptors(good)
        model.memory.fit(desc.flatten(0, 1))
        model.regions.fit(good)
    cal = Calibration(score_source="fused", map_source="fused")
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad(), HostTensorSpy() as spy:
        out = model(images, use_memory=True, bank_fitted=True)
        calibrated_score(out, cal), calibrated_map(out, cal)
    assert out.region_map is not None and out.memory_map is not None
    assert spy.made == 0
    with HostTensorSpy() as spy:
        torch.tensor([0.5])
    assert spy.made == 1  # the spy does see one


def test_graph_path_feeds_forward_hooks_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model()
    cal = Calibration(class_names=("a", "b", "c"))
    eager = Inspector(model, cal, "cpu", precision="fp32")
    graphed = graphs_on_cpu(Inspector(model, cal, "cpu", precision="fp32", buckets=(1, 2, 4)), monkeypatch)
    tap = EvidenceTap(model, evidence_config_for(model), lambda: cal)  # the language path's evidence tokens
    try:
        tokens = []
        for inspector in (eager, graphed):
            with tap.capture() as outputs:
                inspector.inspect_batch(frames(6))  # chunks of 4 and 2 on the graph path
            tokens.append(tap.tokens(outputs))
    finally:
        tap.close()
    assert tokens[1].shape == tokens[0].shape == (6, *tokens[0].shape[1:])
    # float16 tokens: one unit in the last place near 3.0 is 0.002
    torch.testing.assert_close(tokens[1].float(), tokens[0].float(), atol=1e-3, rtol=1e-3)


def test_new_scoring_recaptures_but_a_new_threshold_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    inspector = graphs_on_cpu(Inspector(small_model(), Calibration(), "cpu", precision="fp32"), monkeypatch)
    graphs = inspector.graphs
    inspector.calibration = Calibration(threshold=0.9)
    assert inspector.graphs is graphs and inspector.threshold == 0.9
    inspector.calibration = Calibration(score_source="image")
    assert inspector.graphs is not graphs


# --------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("source", ["head", "fused"])
def test_cuda_graphs_agree_with_eager_on_gpu(source: str) -> None:
    model = small_model()
    if source == "fused":  # the memory bank and the region statistics' score and map under real graphs
        with torch.no_grad():
            good = torch.rand(4, 3, SIZE, SIZE)
            desc, _ = model.descriptors(good)
            model.memory.fit(desc.flatten(0, 1))
            model.regions.fit(good)
    cal = Calibration(score_source=source, map_source=source, class_names=("a", "b", "c"))
    graphed = Inspector(model, cal, "cuda", buckets=(1, 2, 4))
    eager = Inspector(model, cal, "cuda", cuda_graphs=False)
    assert graphed.graphs is not None and graphed.info()["cuda_graphs"] == [1, 2, 4]
    images = frames(6)
    for e, g in zip(eager.inspect_batch(images, heatmaps=True), graphed.inspect_batch(images, heatmaps=True),
                    strict=True):
        assert g.score == pytest.approx(e.score, abs=0.03)
        assert np.abs(g.heatmap - e.heatmap).max() < 0.05


@needs_cuda
def test_cuda_graphs_replay_new_frames_on_gpu() -> None:
    graphed = Inspector(small_model(), Calibration(), "cuda", buckets=(1, 2))
    a, b = frames(1, seed=1), frames(1, seed=2)
    first, second, again = (graphed.inspect_batch(x, heatmaps=True)[0] for x in (a, b, a))
    assert not np.array_equal(first.heatmap, second.heatmap)  # the static input really changes
    assert np.array_equal(first.heatmap, again.heatmap)  # and a replay is deterministic


@needs_cuda
def test_nvjpeg_frames_match_opencv_and_refusals_fall_back() -> None:
    decoder = DeviceJpegDecoder.create("cuda")
    assert decoder is not None
    image = cv2.GaussianBlur(frames(1, (480, 640), seed=3)[0], (0, 0), 3)  # camera-like, not pure noise
    data = encode_jpeg(image, 95)
    frame = decoder.decode(data)
    assert frame is not None and frame.is_cuda and tuple(frame.shape) == (480, 640, 3)
    reference = decode_image(data)
    assert np.abs(frame.cpu().numpy().astype(np.int16) - reference).mean() < 3.0
    assert decoder.decode(data[: len(data) // 2]) is None  # truncated: the CPU decoder names the problem
    assert decoder.decode(encode_png(image)) is None  # not a JPEG
    graphed = Inspector(small_model(), Calibration(), "cuda", buckets=(1, 2))
    on_gpu, on_cpu = graphed.inspect_batch([frame]), graphed.inspect_batch([reference])
    assert on_gpu[0].score == pytest.approx(on_cpu[0].score, abs=0.02)


@needs_cuda
def test_pixel_branch_beside_the_encoder_changes_nothing_on_gpu() -> None:
    model = small_model().cuda()
    images = torch.rand(3, 3, SIZE, SIZE, device="cuda")
    with torch.inference_mode():
        model.overlap_pixel_branch = False
        alone = model(images, use_memory=False)
        model.overlap_pixel_branch = True
        beside = model(images, use_memory=False)
    assert model._side is not None  # the side stream really ran
    for a, b in zip(alone, beside, strict=True):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5)
    assert copy.deepcopy(model)._side is None  # copies leave the stream behind


@needs_cuda
def test_gpu_line_filters_match_the_cpu() -> None:
    """On a GPU the line filters run through FFTs (speed); same values as the CPU's direct convolution."""
    torch.manual_seed(0)
    images, kernels = torch.rand(2, 3, SIZE, SIZE), ridge_kernels()
    on_gpu = ridge_features(images.cuda(), kernels.cuda()).cpu()
    assert torch.allclose(on_gpu, ridge_features(images, kernels), atol=1e-4)
