"""SpotNet in 8-bit integers (models/networks/int8.py): against PyTorch's own
post-training quantization, against the float32 network, on any number of threads, and
loaded from a run folder."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import invoke_cli, one_line_error, overfit, overfit_run, small_training_set

from factory.errors import FactoryError
from models.networks import int8
from models.networks.blocks import Conv1x1, normalize_images, pad_to_multiple
from models.networks.spotnet import SpotNet, decode
from models.training.runs import RunFolder

pytestmark = pytest.mark.skipif(not int8.available(), reason="no oneDNN quantized engine in this PyTorch")


def _two_headed(seed: int = 0, branch_stride: int = 1) -> SpotNet:
    """A SpotNet of the default model's shape (8 - 16 - 32, an exposure decoder) with
    random weights and batch-norm statistics far from the identity (folding must matter)."""
    torch.manual_seed(seed)
    m = SpotNet((8, 16, 32), flip_tta=False, heads=2, branch="decoder", branch_stride=branch_stride)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.3, 3.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
            assert c
    return m.eval()


def _images(n=6):
    images, _ = small_training_set()
    return torch.from_numpy(images[:n])[:, None]


def _fx_reference(model: SpotNet, head: int, calib: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's FX post-training quantization of the same head: min/max activation
    observers (unsigned 8 bit, per tensor) and symmetric per-channel weights, calibrated
    on the same images, the head's last 1 x 1 layer left in float32."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.backend_config import get_onednn_backend_config
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Branch(nn.Module):  # head ``head``'s path through the network, as SpotNet.forward runs it
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            y, skips = self.m.unet.encode(x)
            f = self.m.unet.decode(y, skips, self.m.extra_decoders[head - 1] if head else None)
            return (self.m.extra_heads[head - 1] if head else self.m.head)(f)

    import copy

    ref = Branch(copy.deepcopy(model)).eval()
    for mod in ref.modules():  # FX cannot trace the autograd function; a plain 1 x 1 convolution is the same layer
        if isinstance(mod, Conv1x1):
            mod.forward = nn.Conv2d.forward.__get__(mod)
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    last = f"m.{'extra_heads.' + str(head - 1) if head else 'head'}.2"
    mapping = QConfigMapping().set_global(qconfig).set_module_name(last, None)

    def prep(images):
        x, _ = pad_to_multiple(normalize_images(images), model.unet.multiple)
        return x.contiguous(memory_format=torch.channels_last)

    torch.backends.quantized.engine = int8.ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(ref, mapping, example_inputs=(prep(calib[:1]),), backend_config=get_onednn_backend_config())
        with torch.no_grad():
            prepared(prep(calib))
        q = convert_fx(prepared)
        with torch.no_grad():
            out = q(prep(x))
    # A head short of full resolution: its outputs to their pixels, outside the traced graph
    # (FX would quantize a pixel shuffle's input, the float32 last layer's output).
    out = F.pixel_shuffle(out, model.branch_stride) if head and model.branch_stride > 1 else out
    return out[..., :x.shape[-2], :x.shape[-1]]


@pytest.mark.parametrize("head, branch_stride", [(0, 1), (1, 1), (1, 2)])
def test_int8_head_matches_pytorch_own_quantization(head, branch_stride):
    # Two implementations of the same post-training quantization: PyTorch's FX flow
    # (its observers, its conv-bn fusion, its graph of quantized operators) and ours.
    # Only float32 rounding differs (batch-norm folding, each layer's scale), which can
    # move a value by one 8-bit step: a step or two of the last activation (its range /
    # 255) through the float32 1 x 1 layer.  Also for an exposure branch that stops at
    # half resolution (its head's outputs shuffled to full resolution).
    model = _two_headed(branch_stride=branch_stride)
    calib, x = _images(8), _images(4)
    ranges = int8.calibrate(model, head, calib)
    q = int8.Int8Head(model, head, ranges)
    ours = q(x, head)
    ref = _fx_reference(model, head, calib, x)
    with torch.no_grad():
        exact = model(x, head)
    step = ranges["head"][1] / 255 * float(q.last.weight.detach().abs().sum(1).max())
    err_ours, err_ref = (ours - exact).abs().max(), (ref - exact).abs().max()
    assert (ours - ref).abs().max() < 2 * step, (float((ours - ref).abs().max()), step)
    # Both are approximations of the float network of about the same quality.
    assert err_ours < 2 * err_ref + step, (float(err_ours), float(err_ref))


def test_comparison_catches_unfolded_batch_norm(monkeypatch):
    # A mutation: batch norm not folded into the convolutions.  The comparison with
    # PyTorch's quantization above fails on it (it can fail).
    model = _two_headed()
    calib, x = _images(8), _images(4)
    ref = _fx_reference(model, 1, calib, x)
    monkeypatch.setattr(int8, "_folded", lambda conv, bn: (conv.weight.detach(), None if conv.bias is None
                                                           else conv.bias.detach()))
    ranges = int8.calibrate(model, 1, calib)
    wrong = int8.Int8Head(model, 1, ranges)(x)
    step = ranges["head"][1] / 255 * float(model.extra_heads[0][2].weight.detach().abs().sum(1).max())
    assert (wrong - ref).abs().max() > 10 * step


def test_int8_localises_as_float32():
    # A trained network: the detections of the int8 head are those of float32, at the
    # same places to a small fraction of a pixel.
    det = overfit("spotnet")
    model = det.model
    images, _ = small_training_set()
    x = torch.from_numpy(images)[:, None]
    q = int8.Int8Head(model, 0, int8.calibrate(model, 0, x[:8]))
    with torch.no_grad():
        a, b = decode(model(x, 0), 0.3), decode(q(x, 0), 0.3)
    shifts = []
    for (pa, sa, _), (pb, sb, _) in zip(a, b):
        assert len(pa) == len(pb)
        d = np.linalg.norm(pa[:, None] - pb[None], axis=-1).min(1)
        shifts.extend(d)
        np.testing.assert_allclose(sa, sb, atol=0.05)
    assert len(shifts) >= len(images)
    assert np.max(shifts) < 0.1, np.max(shifts)


def test_int8_same_on_any_number_of_threads_and_in_any_batch():
    # Integer sums are exact: a frame's output depends neither on the threads nor on the
    # frames beside it in a batch (which lets int8 run in larger batches than float32).
    model = _two_headed()
    q = int8.Int8Head(model, 1, int8.calibrate(model, 1, _images(8)))
    x = _images(4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = q(x)
        torch.set_num_threads(max(2, threads))
        many = q(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(torch.cat([q(x[i:i + 1]) for i in range(len(x))]), many)
    # And at the size int8 batches for, 256 x 256 px, where the float32 last layer runs
    # on 2^20 pixels at once.
    gen = torch.Generator().manual_seed(1)
    big = torch.poisson(torch.full((int8.PIXELS_PER_BATCH // 256**2, 1, 256, 256), 3.0), gen)
    assert torch.equal(torch.cat([q(big[i:i + 1]) for i in range(len(big))]), q(big))


def _quantized(gen, shape, scale, zero):
    x = torch.rand(shape, generator=gen) * 255 * scale - zero * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(x, scale, zero, torch.quint8).contiguous(memory_format=torch.channels_last)


def _same_quantized(a, b):
    return torch.equal(a.int_repr(), b.int_repr()) and (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())


@pytest.mark.parametrize("hw, channels", [((8, 12), (6, 4)), ((8, 12), (16, 8)), ((7, 12), (6, 4)), ((8, 9), (16, 8))])
def test_pool_and_upsampled_concatenation_on_codes_are_pytorch_operators(hw, channels):
    # The max pool and the upsampling + concatenation work on the 8-bit codes (faster);
    # they must give PyTorch's quantized operators' bytes, and odd sizes (PyTorch's pool
    # drops the last row; the upsampling is then not 2x) and unequal ranges take
    # PyTorch's operators themselves.  The codes move as 2-byte words for 6 + 4 channels,
    # 8-byte ones for 16 + 8.
    model = _two_headed()
    ops = int8.Int8Head(model, 0, int8.calibrate(model, 0, _images(2)))._ops
    s, z = ops.q["up0.in"]
    gen = torch.Generator().manual_seed(0)
    x = _quantized(gen, (3, 5, *hw), 0.02, 7)
    assert _same_quantized(ops.pool(x), F.max_pool2d(x, 2))
    h, w = hw
    below = _quantized(gen, (3, channels[0], (h + 1) // 2, (w + 1) // 2), s, z)
    for skip in (_quantized(gen, (3, channels[1], h, w), s, z), _quantized(gen, (3, channels[1], h, w), 2 * s, z)):
        ref = torch.ops.quantized.cat([F.interpolate(below, size=(h, w), mode="nearest"), skip], 1, s, z)
        assert _same_quantized(ops.up_cat(below, skip, "up0.in"), ref)
        # Inputs not channels last (not what oneDNN gives, but a valid tensor): byte by byte.
        nchw = below.contiguous(), skip.contiguous()
        assert _same_quantized(ops.up_cat(*nchw, "up0.in"), ref)


def test_ranges_cover_both():
    a = {"input": [-1.0, 2.0], "stem.1": [0.0, 3.0]}
    b = {"input": [-2.0, 1.0], "head": [0.0, 5.0]}
    assert int8.merge(a, b) == {"input": [-2.0, 2.0], "stem.1": [0.0, 3.0], "head": [0.0, 5.0]}


def _int8_run(tmp_path, ranges=None):
    """A run folder of the two-headed network, with int8 ranges recorded as training leaves them."""
    from models.training.config import parse_train_config

    run = RunFolder(tmp_path / "run")
    run.create()
    run.write_config(parse_train_config({"model": "spotnet", "target": "both", "min_score": 0.05,
                                         "model_params": {"widths": [8, 16, 32], "flip_tta": False,
                                                          "branch": "decoder"}}))
    model = _two_headed()
    run.save_best(model, 0)
    if ranges is None:
        ranges = {t: int8.calibrate(model, k, _images(8)) for k, t in enumerate(["centroid", "exposure"])}
    run.write_metrics({"threshold": 0.5, "int8_ranges": ranges})
    return run, model


def test_run_folder_gives_int8_where_it_can(tmp_path):
    run, model = _int8_run(tmp_path)
    det = run.detector(target="exposure", precision="auto")
    assert det.precision == "int8"
    assert det.batch_frames(256, 256) == int8.PIXELS_PER_BATCH // 256**2 > 1  # float32: a frame at a time
    assert run.detector(target="exposure", precision="float32").batch_frames(256, 256) == 1
    assert run.detector(target="exposure").precision == "float32"  # the library's default
    x = _images(2)
    with torch.no_grad():
        expected = int8.Int8Head(model, 1, run.int8_ranges("exposure"))(x)
    table = det.detect(x[:, 0].numpy())
    ref = decode(expected, 0.05)
    assert len(table) == sum(len(s) for _, s, _ in ref)


def test_int8_refused_with_a_reason(tmp_path):
    run = overfit_run(tmp_path / "old")  # flip averaging, no ranges: auto falls back to float32
    assert run.detector(precision="auto").precision == "float32"
    with pytest.raises(FactoryError, match="averages flips"):
        run.detector(precision="int8")
    run2, _ = _int8_run(tmp_path / "b", ranges={"exposure": {"input": [0.0, 1.0]}})
    with pytest.raises(FactoryError, match="no int8 ranges for the centroid head"):
        run2.detector(target="centroid", precision="int8")
    with pytest.raises(FactoryError, match="int8 ranges lack"):
        run2.detector(target="exposure", precision="int8")
    with pytest.raises(FactoryError, match="unknown"):
        run2.detector(precision="int4")


def test_bad_ranges_named_by_file(tmp_path):
    run, _ = _int8_run(tmp_path)
    m = json.loads(run.file(run.METRICS).read_text())
    m["int8_ranges"]["exposure"]["input"] = "wide"
    run.file(run.METRICS).write_text(json.dumps(m))
    with pytest.raises(FactoryError, match="metrics.json: int8_ranges.exposure"):
        run.detector(target="exposure", precision="auto")
    m["int8_ranges"]["exposure"]["input"] = [2.0, 1.0]
    run.file(run.METRICS).write_text(json.dumps(m))
    with pytest.raises(FactoryError, match="not a finite"):
        run.detector(target="exposure", precision="int8")


def test_ranges_and_thresholds_that_are_no_calibration_are_refused_naming_the_field(tmp_path):
    # JSON takes NaN; an infinite or huge range would make an 8-bit step swallow every
    # value (before: 0 tracks, exit 0); a metrics.json that is not an object is refused too.
    run, _ = _int8_run(tmp_path)
    good = json.loads(run.file(run.METRICS).read_text())
    for edit, words in ((lambda m: m["int8_ranges"]["exposure"].update(input=[float("nan"), 1.0]), "int8_ranges.exposure"),
                        (lambda m: m["int8_ranges"]["exposure"].update(input=[-1e300, 1e300]), "int8_ranges.exposure"),
                        (lambda m: m.update(int8_ranges=[1, 2]), "int8_ranges must map"),
                        (lambda m: m.update(threshold=float("nan")), "threshold must be a finite number")):
        m = json.loads(json.dumps(good))
        edit(m)
        run.file(run.METRICS).write_text(json.dumps(m))
        with pytest.raises(FactoryError, match=words):
            run.detector(target="exposure", precision="auto")
    run.file(run.METRICS).write_text("[1, 2, 3]")
    with pytest.raises(FactoryError, match="must hold a JSON object"):
        run.detector(target="exposure", precision="auto")


def test_track_precision_flag(tmp_path):
    import tifffile

    run, _ = _int8_run(tmp_path)
    movie = (small_training_set()[0][:3]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", movie, photometric="minisblack")
    r = invoke_cli("track", str(run.path), str(tmp_path / "m.tif"), "--out", str(tmp_path / "t"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "track.json").read_text())["precision"] == "int8"
    old = overfit_run(tmp_path / "old")
    r = invoke_cli("track", str(old.path), str(tmp_path / "m.tif"), "--out", str(tmp_path / "t2"), "--precision", "int8")
    one_line_error(r, "int8 inference cannot run", "averages flips")
    assert not (tmp_path / "t2").exists()
