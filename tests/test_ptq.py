"""lowbit.ptq: BatchNorm folding, FGQ post-training quantization, calibration, the integer reference
pipeline against the float simulation, and a PTQ run on a small trained model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
import lowbit.ptq as ptq
from lowbit.methods.fgq import DFPCalibratedAct, FGQKBitWeight, FGQTernaryWeight


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread (two spin badly on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))


class Custom(nn.Module):
    """Not a Sequential: folding must find conv->bn through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.post = nn.BatchNorm2d(4)  # after a ReLU: must stay
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.post(torch.relu(self.bn2(self.conv2(x))))
        return self.bn_fc(self.fc(x.flatten(1)))


def test_fold_batchnorm_equals_unfused_model_float64():
    torch.manual_seed(0)
    model = Custom().double().eval()
    randomize_bn(model)
    x = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    ref = model(x)
    folded = ptq.fold_batchnorm(model)
    assert sorted(folded) == [("conv", "bn"), ("conv2", "bn2"), ("fc", "bn_fc")]
    assert isinstance(model.bn, nn.Identity) and isinstance(model.post, nn.BatchNorm2d)
    assert model.conv.bias is not None  # created by the fold
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_fold_batchnorm_sequential_mlp_and_shared_output_left_alone():
    torch.manual_seed(1)
    seq = (
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        .double()
        .eval()
    )
    randomize_bn(seq, 1)
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = seq(x)
    assert ptq.fold_batchnorm(seq) == [("0", "1")]
    torch.testing.assert_close(seq(x), ref, rtol=1e-12, atol=1e-12)

    class Shared(nn.Module):  # conv output used by the BN *and* a skip: not foldable
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert ptq.fold_batchnorm(Shared().eval()) == []


# ----------------------------------------------------------------------------------------------
# Integer pipeline vs float simulation


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def sim_input_ints(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DFP integers the float simulation feeds every quantized layer (captured by hooks)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, DFPCalibratedAct):

            def hook(mod, inp, out, name=name):
                got[name.rsplit(".input_quantizer", 1)[0]] = out * 2.0 ** (-mod.last_exponent)

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    got["__out__"] = out
    return got


@pytest.mark.parametrize(
    "kw",
    [
        dict(group_size=4, weight_bits=2, act_bits=8),
        dict(group_size=3, weight_bits=2, act_bits=8, group_axis="out"),
        dict(group_size="layer", weight_bits=2, act_bits=4),
        dict(group_size=5, weight_bits=4, act_bits=8, rule="max"),
        dict(group_size=4, weight_bits=2, act_bits=8, act_mode="dynamic"),
    ],
)
def test_integer_pipeline_equals_float_simulation_float64(kw):
    torch.manual_seed(2)
    model = small_cnn().double().eval()
    randomize_bn(model, 2)
    x = torch.randn(16, 2, 8, 8, dtype=torch.float64)
    ptq.fgq(model, [x[:8], x[8:]], keep=(), **kw)
    sim = sim_input_ints(model, x)
    trace: list[dict] = []
    out = ptq.integer_forward(model, x, trace)
    assert [t["name"] for t in trace] == ["0", "3", "8", "10"]
    assert trace[0]["x_int"].min() < 0  # the raw input is signed ...
    assert trace[1]["x_int"].min() >= 0  # ... after ReLU it is unsigned
    for t in trace:
        # the DFP integers of every layer input agree bit for bit
        assert torch.equal(t["x_int"].double(), sim[t["name"]]), t["name"]
    torch.testing.assert_close(out, sim["__out__"], rtol=1e-11, atol=1e-11)


def test_integer_accumulators_equal_int64_reference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(11, 6))
    x = torch.randn(7, 11)
    ptq.fgq(model, x, keep=(), group_size=4)
    trace: list[dict] = []
    ptq.integer_forward(model, x, trace)
    (t,) = trace
    qw = model[0].quantized_weight()
    codes = qw.codes.long()
    xi = t["x_int"]
    # naive int64 reference: acc[b, o, g] = sum over the g-th run of 4 inputs (the last run has 3)
    ref = torch.zeros(7, 6, 3, dtype=torch.int64)
    for g, start in enumerate(range(0, 11, 4)):
        ref[:, :, g] = (xi[:, None, start : start + 4] * codes[None, :, start : start + 4]).sum(-1)
    assert t["acc"].dtype == torch.int64 and torch.equal(t["acc"], ref)
    assert t["acc"].abs().max() < 2**31  # fits an int32 accumulator


def test_integer_pipeline_conv_accumulators_equal_int64_reference():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 5, 5)
    ptq.fgq(model, x, keep=(), group_size=5)
    trace: list[dict] = []
    ptq.integer_forward(model, x, trace)
    (t,) = trace
    codes = model[0].quantized_weight().codes.long()  # (4, 3, 3, 3): K = 27 -> groups 5,5,5,5,5,2
    xi = torch.nn.functional.pad(t["x_int"], (1, 1, 1, 1))
    acc = t["acc"]  # (B, L, O, G)
    assert acc.shape == (2, 9, 4, 6)
    for b in range(2):
        for oy in range(3):
            for ox in range(3):
                patch = xi[b, :, 2 * oy : 2 * oy + 3, 2 * ox : 2 * ox + 3].reshape(-1)
                for o in range(4):
                    prod = patch * codes[o].reshape(-1)
                    ref = [int(prod[s : s + 5].sum()) for s in range(0, 27, 5)]
                    assert acc[b, oy * 3 + ox, o].tolist() == ref


def test_integer_pipeline_float32_close_to_simulation():
    torch.manual_seed(5)
    model = small_cnn().eval()
    randomize_bn(model, 5)
    x = torch.randn(32, 2, 8, 8)
    ptq.fgq(model, x, keep=("first",))
    out_int = ptq.integer_forward(model, x)
    with torch.no_grad():
        out_sim = model(x)
    scale = float(out_sim.abs().max())
    # float32 summation order may move a value across a rounding boundary of the next DFP
    # quantizer by one step; the outputs still agree to a few DFP steps.
    assert float((out_int - out_sim).abs().max()) <= 0.02 * scale


def test_integer_forward_refuses_float_inputs():
    model = nn.Sequential(nn.Linear(4, 4))
    ptq.fgq(model, torch.randn(3, 4), keep=(), act_bits=None)
    with pytest.raises(ValueError, match="DFP input"):
        ptq.integer_forward(model, torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------
# fgq(): structure, calibration, report, options


def test_fgq_structure_report_and_options():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(10, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 9),
        nn.ReLU(),
        nn.Linear(9, 3),
    ).eval()
    randomize_bn(model, 6)
    x = torch.randn(64, 10)
    original = model
    q = ptq.fgq(model, [(x[:32], None), (x[32:], None)], group_size=4, inplace=False)
    assert isinstance(original[0], nn.Linear) and isinstance(original[1], nn.BatchNorm1d)
    assert isinstance(q[0], nn.Linear)  # first and last kept float
    assert isinstance(q[3].weight_quantizer, FGQTernaryWeight)
    assert isinstance(q[1], nn.Identity)  # BN folded
    assert q.__dict__["_lowbit_ptq"]["folded_bn"] == [("0", "1")]
    rows = ptq.report(q)
    assert [r.name for r in rows] == ["3"]
    r = rows[0]
    assert r.alphas == 9 * 4  # 9 outputs x ceil(16 / 4) groups
    assert r.mults_replaced == pytest.approx(0.75)
    assert r.act.startswith("udfp8") and r.exponent is not None
    assert r.saturation == 0.0  # max calibration: nothing saturates on the calibration data
    qw = q[3].quantized_weight()
    assert r.sparsity == pytest.approx(float((qw.codes == 0).float().mean()))
    assert "mults->adds" in ptq.format_report(rows)
    with pytest.raises(TypeError, match="unknown option"):
        ptq.fgq(original, x, group_axes="in")


def test_fgq_percentile_calibration_saturates_outliers_max_does_not():
    torch.manual_seed(7)
    x = torch.randn(512, 8)
    x[0, 0] = 40.0  # one outlier input
    exps, sats = {}, {}
    for how in ("max", "percentile"):
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        torch.manual_seed(8)
        for p in m.parameters():
            nn.init.normal_(p)
        m[0].weight.data = torch.eye(8)
        m[0].bias.data.zero_()
        ptq.fgq(m, x, keep=("first", "last"), act_calibration=how, percentile=99.9)
        exps[how] = m[1].input_quantizer.exponent
        sats[how] = ptq.report(m)[0].saturation
    # max: 40 needs E = -1 (signed: 40*2 = 80 <= 127); percentile 99.9 of |x| is ~3.3 -> E = -5
    assert exps["max"] == -1
    assert exps["percentile"] == -5
    assert sats["max"] == 0.0 and 0.0 < sats["percentile"] <= 0.001 + 1 / 4096


def test_fgq_four_bit_weights_and_state_dict_roundtrip():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(40, 12)
    ptq.fgq(model, x, group_size=8, weight_bits=4, keep=())
    assert isinstance(model[2].weight_quantizer, FGQKBitWeight)
    assert model[2].quantized_weight().codes.abs().max() <= 7
    sd = model.state_dict()
    fresh = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lowbit.quantize(fresh, "fgq", keep=(), group_size=8, weight_bits=4, act_mode="calibrated")
    fresh.load_state_dict(sd)
    fresh.eval()
    assert fresh[2].input_quantizer.exponent == model[2].input_quantizer.exponent
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ----------------------------------------------------------------------------------------------
# A PTQ run on a small trained model


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six overlapping Gaussian classes in 24-d: a float MLP reaches ~82%, not 100%, so
    quantization damage shows."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, 24, generator=torch.Generator().manual_seed(123)) * 0.5
    y = torch.randint(0, 6, (n,), generator=g)
    return centers[y] + torch.randn(n, 24, generator=g), y


def test_ptq_on_trained_model_keeps_accuracy_and_finetune_recovers_large_n():
    torch.manual_seed(10)
    xtr, ytr = _blobs(3000, 1)
    xte, yte = _blobs(2000, 2)
    w = 64
    model = nn.Sequential(
        nn.Linear(24, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, 6),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for i in range(0, 3000, 100):
            loss = nn.functional.cross_entropy(model(xtr[i : i + 100]), ytr[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = list(zip(xte.split(500), yte.split(500), strict=True))
    fp = ptq.accuracy(model, test)
    assert fp > 75.0

    acc = {}
    for n in (1, 4):
        q = ptq.fgq(model, xtr[:512], group_size=n, inplace=False)
        acc[n] = ptq.accuracy(q, test)
    assert acc[1] >= fp - 1.5, (fp, acc)
    assert acc[4] >= fp - 4.0, (fp, acc)
    # the integer reference pipeline classifies like the float simulation
    assert ptq.accuracy(q, test, integer=True) == pytest.approx(acc[4], abs=0.3)

    # one alpha per layer, every layer quantized, 4-bit activations: clearly worse than N = 1 ...
    q_big = ptq.fgq(model, xtr[:512], group_size="layer", act_bits=4, keep=(), inplace=False)
    before = ptq.accuracy(q_big, test)
    assert before < acc[1] - 2.0, (acc, before)
    # ... and a short straight-through fine-tuning recovers part of it (§4.3)
    train = list(zip(xtr.split(100), ytr.split(100), strict=True))
    losses = ptq.finetune(q_big, train, epochs=2, lr=1e-3, calibration=xtr[:512])
    after = ptq.accuracy(q_big, test)
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert after >= before + 2.0, (fp, before, after)


# ----------------------------------------------------------------------------------------------
# CLI: lowbit ptq RUN_DIR


def test_cli_ptq_writes_model_and_reports(tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit import data, models
    from lowbit.cli import app
    from lowbit.train.checkpoint import save_checkpoint

    torch.manual_seed(11)
    spec = {"name": "mlp", "options": {"widths": [32, 32]}}
    net = models.create("mlp", input_shape=(1, 28, 28), num_classes=10, widths=(32, 32))
    randomize_bn(net, 11)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", {"model": net.state_dict()}, 1, kind="best")
    (run / "config.json").write_text(json.dumps({"model": spec, "dataset": {"name": "synthetic"}}))

    result = CliRunner().invoke(
        app, ["ptq", str(run), "--group-size", "4", "--calib-samples", "128"]
    )
    assert result.exit_code == 0, result.output
    assert "mults->adds" in result.output and "test accuracy: float" in result.output
    out = run / "ptq-fgq-n4-in-w2-a8.pt"
    assert out.is_file()

    # the written model is the one fgq() builds from the same float weights and data
    loaded = ptq.load_quantized(out)
    splits = data.load("synthetic")
    net.eval()
    float_net = copy.deepcopy(net)
    direct = ptq.fgq(net, splits.train.x[:128], group_size=4)
    x = splits.test.x[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), direct(x))
    assert loaded.net.fc1.input_quantizer.exponent == direct.net.fc1.input_quantizer.exponent

    # --scale-bits 8: the file name says so, the reloaded model keeps its fixed-point scales
    result = CliRunner().invoke(
        app, ["ptq", str(run), "--calib-samples", "128", "--scale-bits", "8", "--no-eval"]
    )
    assert result.exit_code == 0, result.output
    loaded8 = ptq.load_quantized(run / "ptq-fgq-n4-in-w2-a8-s8.pt")
    assert loaded8.net.fc1.weight_quantizer.scale_bits == 8
    direct8 = ptq.fgq(float_net, splits.train.x[:128], group_size=4, scale_bits=8)
    with torch.no_grad():
        assert torch.equal(loaded8(x), direct8(x))
    packed = lowbit.pack(loaded8)
    assert packed.net.fc1.config()["scale_format"] == "fixed8"

    # eval and summary take the ptq file as pack does
    ptq_file = str(run / "ptq-fgq-n4-in-w2-a8-s8.pt")
    res = CliRunner().invoke(app, ["eval", ptq_file, "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)["test"]
    with torch.no_grad():
        hits = (loaded8(splits.test.x).argmax(1) == splits.test.y).double().mean().item()
    assert got["acc"] == pytest.approx(hits) and got["error"] == pytest.approx(100 * (1 - hits))
    res = CliRunner().invoke(app, ["summary", ptq_file])
    assert res.exit_code == 0 and "fgq" in res.output.lower(), res.output
    # other options, other default file names: nothing is overwritten
    res = CliRunner().invoke(
        app,
        ["ptq", str(run), "--calib-samples", "128", "--no-eval", "--keep", "none",
         "--calibration", "percentile", "--act-mode", "dynamic", "--rule", "0.7"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (run / "ptq-fgq-n4-in-w2-a8-rule0.7-dynamic-p99.99-keep-none.pt").exists()
    for n in ("0", "-5"):  # not "all of them" (a negative slice) nor a crash
        bad = CliRunner().invoke(app, ["ptq", str(run), "--calib-samples", n, "--no-eval"])
        assert bad.exit_code == 2 and f"--calib-samples must be at least 1, got {n}" in bad.output
    bad = CliRunner().invoke(app, ["ptq", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    # a run of a quantization method is not a float model: say so (not a state-dict key dump)
    (run / "config.json").write_text(
        json.dumps({"model": spec, "dataset": {"name": "synthetic"}, "method": {"name": "ttq"}})
    )
    bad = CliRunner().invoke(app, ["ptq", str(run)])
    assert bad.exit_code == 2 and "was trained with method 'ttq'" in bad.output
    assert "give the run of its float baseline" in bad.output


def test_saturation_is_recounted_on_evaluation_data():
    torch.manual_seed(13)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = 0.9 * torch.rand(256, 4)  # in [0, 0.9): unsigned, E = -8 (0.9 * 256 = 230 <= 255)
    ptq.fgq(m, x, keep=("last",))
    assert m[0].input_quantizer.exponent == -8 and ptq.report(m)[0].saturation == 0.0
    y = torch.zeros(256, dtype=torch.long)
    ptq.accuracy(m, [(10 * x, y)], saturation=True)
    # 10x saturates where round(10x * 256) > 255, i.e. x > 0.0998: probability 0.8/0.9 = 0.889
    sat = ptq.report(m)[0].saturation
    assert 0.85 < sat < 0.93


@pytest.mark.parametrize("group_size", [8])
def test_integer_reference_agrees_with_cpp_ternary_kernel(group_size, isa):
    """The packed C++ kernel (issue 9) computes the same layer: int8 DFP inputs with the calibrated
    exponent, int32 per-group accumulators (bit-exact), fp32 epilogue (float tolerance)."""
    from lowbit import kernels

    if not hasattr(kernels, "ternary_linear") or not hasattr(kernels, "pack_ternary_scales"):
        pytest.skip("the ternary kernels are not built in this version")
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(40, 24))
    x = torch.randn(9, 40)
    ptq.fgq(model, x, keep=(), group_size=group_size, act_signed=True)  # the kernels take int8
    layer = model[0]
    qw = layer.quantized_weight()
    e = layer.input_quantizer.exponent
    y_ref, trace = ptq.integer_layer(layer, x)
    # integer part: the kernel's int32 GEMM equals the sum of our per-group accumulators
    d = kernels.ternary_gemm(trace["x_int"].to(torch.int8), kernels.pack_ternary(qw.codes), 24)
    assert torch.equal(d.long(), trace["acc"].sum(-1))
    scale, _ = kernels.pack_ternary_scales(qw.scales, 24, 40, group_size=group_size)
    y_k = kernels.ternary_linear(
        x, kernels.pack_ternary(qw.codes), scale, None, kernels.pad_bias(layer.bias, 24),
        out_features=24, group_size=group_size, act="dfp", exponent=e,
    )  # fmt: skip
    torch.testing.assert_close(y_k, y_ref, rtol=1e-5, atol=1e-5)


def test_empty_calibration_and_one_shot_finetune_data_are_refused(tmp_path) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="batches of 0 samples"):
        ptq.fgq(copy.deepcopy(net), torch.empty(0, 4))
    q = ptq.fgq(copy.deepcopy(net), torch.randn(32, 4))
    batches = ((torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3))
    with pytest.raises(ValueError, match="epoch 2 got no samples: pass a re-iterable"):
        ptq.finetune(q, batches, epochs=2, lr=1e-4)
