"""The fused Triton LIF kernel against the pure-torch reference: compiled and run on the GPU where CUDA
is present, else in Triton's interpreter on the CPU (the same kernel source a GPU compiles).

The kernels compile without FMA contraction (``lif._NO_FMA``): each product and sum rounds on its own,
as in torch's separate kernels, on a GPU as in the interpreter. So the forward spikes compare bit for
bit, and the fused LIF + pool backward equals the LIF backward then the pool's bit for bit. Gradients
against autograd through the pure-torch scan compare within fp32 tolerance (autograd adds the two paths
into g_u in its own order).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process
DEVICE = torch.device("cuda" if CUDA else "cpu")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import REPO, ZOO, zoo_ids  # noqa: E402
from helpers import reference_file, tiny_zoo_config  # noqa: E402
from snncompile.data import random_input  # noqa: E402
from snncompile.init_run import calibrate_firing  # noqa: E402
from snncompile.kernels import fused_lif  # noqa: E402
from snncompile.models import LIFCell, network_from_config  # noqa: E402
from snncompile.neurons import LIFParams, lif_scan  # noqa: E402

P = LIFParams(v_th=0.5, k_tau1=0.2, a=1.0)


def test_forward_matches_torch_scan_bit_for_bit():
    currents = torch.randn(6, 3, 5, 7, device=DEVICE)  # N = 105 is not a multiple of the block: masked tail
    assert torch.equal(fused_lif(currents, P.k_tau1, P.v_th, P.a), lif_scan(currents, P))


def test_backward_matches_autograd_through_torch_scan():
    base = torch.randn(8, 4, 33, device=DEVICE) * 0.6 + 0.3
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    weights = torch.randn(8, 4, 33, device=DEVICE)
    (fused_lif(a, P.k_tau1, P.v_th, P.a) * weights).sum().backward()
    (lif_scan(b, P) * weights).sum().backward()
    assert b.grad.abs().sum() > 0
    # on the GPU the backward's FMAs round differently from autograd's separate kernels
    tol = {"rtol": 1e-5, "atol": 1e-6} if CUDA else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(a.grad, b.grad, **tol)


def test_reset_gate_gradient_by_hand():
    # loss o2 = H(u2 - .5) with u2 = .2*u1*(1 - o1) + I2, u1 = I1 = .7 (o1 = 1), I2 = .1 (u2 = .1):
    # do2/dI1 = sg(u2) * (k*(1 - o1) - k*u1*sg(u1)) = 1 * (0 - .2*.7*1) = -.14; do2/dI2 = sg(u2) = 1
    currents = torch.tensor([[0.7], [0.1]], device=DEVICE, requires_grad=True)
    fused_lif(currents, 0.2, 0.5, 1.0)[1].sum().backward()
    assert currents.grad[0].item() == pytest.approx(-0.14)
    assert currents.grad[1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("pool", [None, 2])
def test_surrogate_width_a_by_hand(pool):
    # a = .5: sg(u) = 1/a = 2 where |u - .5| < a/2 = .25, else 0. u1 = I1 = .7 (o1 = 1, sg 2), u2 = .2*.7*0 + .6 = .6
    # (sg 2): do2/dI1 = sg(u2) * (k*(1 - o1) - k*u1*sg(u1)) = 2 * (0 - .2*.7*2) = -.56; do2/dI2 = sg(u2) = 2.
    # A kernel that ignored a (width 1, height 1) gives -.14 and 1. Pooled: 2x2 copies of the neuron, each
    # current's gradient a quarter of that (the mean of four equal spikes).
    from snncompile.kernels import fused_lif_pool

    currents = torch.tensor([[0.7], [0.6]], device=DEVICE)
    if pool is None:
        leaf = currents.clone().requires_grad_(True)
        fused_lif(leaf, 0.2, 0.5, 0.5)[1].sum().backward()
        want = [-0.56, 2.0]
    else:
        leaf = currents.reshape(2, 1, 1, 1, 1).expand(2, 1, 1, 2, 2).contiguous().requires_grad_(True)
        fused_lif_pool(leaf, 0.2, 0.5, 0.5, 2)[1].sum().backward()
        want = [-0.14] * 4 + [0.5] * 4
    assert leaf.grad.flatten().tolist() == pytest.approx(want)
    # and the torch reference the kernels are tested against elsewhere, at other widths
    ref = currents.clone().requires_grad_(True)
    lif_scan(ref, LIFParams(v_th=0.5, k_tau1=0.2, a=0.5))[1].sum().backward()
    assert ref.grad.flatten().tolist() == pytest.approx([-0.56, 2.0])


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_backward_at_other_surrogate_widths_matches_autograd(a):
    """Every zoo model trains at a = 1: the kernels' use of a is pinned here (LIF, LIF + pool)."""
    from snncompile.kernels import fused_lif_pool

    p = LIFParams(v_th=0.5, k_tau1=0.2, a=a)
    base = torch.randn(6, 2, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.6 + 0.3
    weights = torch.randn(6, 2, 3, 2, 2, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref, lif, pooled = (base.clone().requires_grad_(True) for _ in range(3))
    want = torch.nn.functional.avg_pool2d(lif_scan(ref, p).flatten(0, 1), 2).unflatten(0, base.shape[:2])
    (want * weights).sum().backward()
    got = torch.nn.functional.avg_pool2d(fused_lif(lif, p.k_tau1, p.v_th, p.a).flatten(0, 1), 2)
    (got.unflatten(0, base.shape[:2]) * weights).sum().backward()
    (fused_lif_pool(pooled, p.k_tau1, p.v_th, p.a, 2) * weights).sum().backward()
    assert ref.grad.abs().sum() > 0
    for grad in (lif.grad, pooled.grad):
        torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-6)


def randomize_neunorm(net) -> None:
    """NeuNorm's U starts at 0, which would hide its whole output term from a comparison: small random U."""
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("u_scale"):
                param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("path", ZOO, ids=zoo_ids())
def test_zoo_networks_fused_equal_pure_torch(path):
    cfg = tiny_zoo_config(path)
    net = network_from_config(cfg.model).eval().to(DEVICE)
    x = random_input(cfg, 8, torch.Generator().manual_seed(0)).to(DEVICE)
    calibrate_firing(net, x)
    randomize_neunorm(net)
    grads, outs = {}, {}
    for fused in (False, True):
        net.fused_lif = fused
        net.zero_grad()
        outs[fused] = net(x)
        outs[fused].square().sum().backward()
        grads[fused] = [p.grad.clone() for p in net.parameters()]
    assert torch.equal(outs[False], outs[True])
    for g_fused, g_torch in zip(grads[True], grads[False]):
        scale = g_torch.abs().max().item()
        torch.testing.assert_close(g_fused, g_torch, rtol=1e-4, atol=1e-5 * max(scale, 1e-6))
    assert any(g.abs().sum() > 0 for g in grads[True])


def test_torch_fast_with_the_fused_kernel_reports_every_layer_like_torch(tmp_path):
    """torch-fast's fused path (the GPU path; here in the interpreter) against the torch reference:
    every layer's spikes and membranes, bit for bit, on an export with per-layer outputs."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from snncompile.backends import create_runner
    from snncompile.export_onnx import export_run
    from helpers import make_run
    from conftest import REPO

    run = make_run(tmp_path, tiny_zoo_config(REPO / "models" / "dvs_gesture.toml"))
    export_run(run, layers=True, n_random=8, n_real=0)
    x = np.load(reference_file(run))["random"]
    with create_runner("torch", run, "model_layers.onnx", device=DEVICE.type) as ref, \
            create_runner("torch-fast", run, "model_layers.onnx", device=DEVICE.type, fused=True) as fast:
        assert fast.graph.net.fused_lif
        want, got = ref.infer({"input": x}), fast.infer({"input": x})
    assert set(got) == set(want) and any(k.endswith(".membrane") for k in got)
    assert sum(float(v.sum()) for k, v in got.items() if k.endswith(".spikes")) > 0
    for name in want:
        if CUDA and name.endswith(".membrane"):
            # on the GPU the two runs may pick different cuDNN algorithms (last-bit differences)
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_fused_path_with_compact_spikes_keeps_the_same_gradients():
    from snncompile.memory import SavedActivations

    cfg = tiny_zoo_config(ZOO[[p.endswith("bench-cifar.toml") for p in ZOO].index(True)])
    torch.manual_seed(0)
    net = network_from_config(cfg.model).eval().to(DEVICE)
    net.fused_lif = True
    x = (torch.rand(cfg.model.T, 2, *cfg.model.input_shape, device=DEVICE) < 0.3).float()
    results = []
    for compact in (False, True):
        net.zero_grad(set_to_none=True)
        with SavedActivations(compact=compact) as saved:
            scores = net(x)
        scores.square().sum().backward()
        results.append((saved.saved_bytes, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (plain, g_plain), (compact, g_compact) = results
    assert compact < plain
    for name in g_plain:
        if CUDA:
            # cuDNN's weight-gradient kernels may sum in a different order from one call to the next
            # (seen on an H200: last-digit differences in stages.0.weight); the spikes fed to them are equal
            torch.testing.assert_close(g_compact[name], g_plain[name], rtol=1e-4, atol=1e-8, msg=name)
        else:
            assert torch.equal(g_plain[name], g_compact[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_currents_are_kept_instead_of_the_membrane_with_the_same_gradients(dtype):
    """Under autocast the currents are bf16/fp16: backward recomputes the fp32 membrane from them rather
    than autograd keeping it, which halves the bytes kept and must not change a gradient bit."""
    from snncompile.memory import SavedActivations

    torch.manual_seed(0)
    base = (torch.randn(8, 4, 33, device=DEVICE) * 0.6 + 0.3).to(dtype)
    weights = torch.randn(8, 4, 33, device=DEVICE)
    half = base.clone().requires_grad_(True)
    full = base.float().requires_grad_(True)  # the same values: this path keeps the membrane
    kept = []
    for currents in (half, full):
        with SavedActivations() as saved:
            spikes = fused_lif(currents, P.k_tau1, P.v_th, P.a)
        kept.append(saved.saved_bytes)
        (spikes * weights).sum().backward()
    assert kept == [base.numel() * 2, base.numel() * 4]  # 16-bit currents vs the fp32 membrane
    assert half.grad.dtype == dtype
    assert torch.equal(half.grad, full.grad.to(dtype))
    assert half.grad.abs().sum() > 0


def test_fused_spikes_in_half_precision_are_the_same_spikes():
    currents = torch.randn(5, 2, 40, device=DEVICE)
    half = fused_lif(currents, P.k_tau1, P.v_th, P.a, torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half.float(), lif_scan(currents, P))


def test_channels_last_currents_stay_channels_last_with_the_same_spikes_and_gradients():
    """Under channels_last convolutions a layer's currents arrive as [T, B, C, H, W] with channels last
    inside each step: the kernel works in that layout (no copy) and returns spikes in it."""
    base = torch.randn(4, 3, 5, 6, 7, device=DEVICE) * 0.6 + 0.3
    last = base.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 3))
    assert not last.is_contiguous() and torch.equal(last, base)
    a = base.clone().requires_grad_(True)
    b = last.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    assert b.stride() == last.stride()
    weights = torch.randn(4, 3, 5, 6, 7, device=DEVICE)  # contiguous: backward's gradient comes in another layout
    spikes_a, spikes_b = fused_lif(a, P.k_tau1, P.v_th, P.a), fused_lif(b, P.k_tau1, P.v_th, P.a)
    assert spikes_b.stride() == last.stride()
    assert torch.equal(spikes_a, spikes_b) and torch.equal(spikes_a, lif_scan(base, P))
    (spikes_a * weights).sum().backward()
    (spikes_b * weights).sum().backward()
    assert a.grad.abs().sum() > 0
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pooled_spikes_give_the_same_scores_and_gradients_fused_or_not(monkeypatch, precision):
    """A LIF followed by a 2x2 average pool and a conv, three ways: the LIF kernel then the pool on fp32
    spikes (the reference), the pool on spikes the kernel wrote in bf16 (m/4 is exact there), and the pool
    inside the LIF kernel (forward writes only pooled spikes, backward spreads their gradient over each
    window). Same scores and every gradient the same, under bf16 autocast and in fp32."""
    import snncompile.models as models

    cfg = tiny_zoo_config(ZOO[[p.endswith("bench-nmnist.toml") for p in ZOO].index(True)])
    cfg.model.input_shape = (2, 17, 19)  # odd sizes: the pools' floor drops the last row/column of neurons
    x = random_input(cfg, 3, torch.Generator().manual_seed(0)).to(DEVICE)
    y = torch.randint(0, cfg.model.classes, (3,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    exact, fuses = models._pools_exactly, models._fuses_into_lif
    variants = {"fp32 spikes, pool": dict(_pools_exactly=lambda module, dtype: False),
                "bf16 spikes, pool": dict(_fuses_into_lif=lambda pool, dtype: False),
                "pool in the LIF kernel": {}}
    results = {}
    for name, patches in variants.items():
        monkeypatch.setattr(models, "_pools_exactly", exact)
        monkeypatch.setattr(models, "_fuses_into_lif", fuses)
        for attr, fn in patches.items():
            monkeypatch.setattr(models, attr, fn)
        torch.manual_seed(0)
        net = network_from_config(cfg.model).to(DEVICE)
        calibrate_firing(net, x)
        net.fused_lif = True
        pooled_dtypes = []
        for stage in net.stages:
            if isinstance(stage, torch.nn.AvgPool2d):
                stage.register_forward_pre_hook(lambda mod, args: pooled_dtypes.append(args[0].dtype))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            scores = net(x).float()
        torch.nn.functional.cross_entropy(scores, y).backward()
        results[name] = (pooled_dtypes, scores.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    half = torch.bfloat16 if precision == "bf16" else torch.float32
    assert [r[0] for r in results.values()] == [[torch.float32] * 2, [half] * 2, []]  # [] : no pool stage ran
    _, ref_scores, ref_grads = results["fp32 spikes, pool"]
    assert ref_grads["stages.0.weight"].abs().sum() > 0  # the gradient reaches the first conv
    for name, (_, scores, grads) in results.items():
        assert torch.equal(scores, ref_scores), name
        for param, grad in ref_grads.items():
            if CUDA:  # cuDNN's weight-gradient sums may differ in order from call to call (see above)
                torch.testing.assert_close(grads[param], grad, rtol=1e-4, atol=1e-8, msg=f"{name}: {param}")
            elif param.endswith("bias"):  # the kernels sum a bias's gradient over T (and a pooled one over
                # its window) in registers, the rest in torch: the same fp32 sum in another order
                torch.testing.assert_close(grads[param], grad, rtol=1e-5, atol=1e-7, msg=f"{name}: {param}")
            else:
                assert torch.equal(grads[param], grad), f"{name}: {param}"


def test_fused_lif_pool_kernel_equals_the_lif_then_the_pool():
    """The LIF + average pool kernel against lif_scan then avg_pool2d: pooled spikes bit for bit and, in
    fp32 and bf16, the gradient of the currents equal to the fused LIF then the pool (bit for bit) and to
    autograd through the pure-torch scan (fp32 tolerance); the floor dropping odd rows and columns, both
    per-step layouts, 2x2 and 4x4."""
    from snncompile.kernels import fused_lif_pool

    torch.manual_seed(0)
    for shape, k in (((4, 3, 5, 17, 17), 2), ((3, 2, 4, 9, 8), 2), ((3, 2, 3, 16, 19), 4)):
        currents = torch.randn(shape, device=DEVICE) * 0.6 + 0.3
        want = torch.nn.functional.avg_pool2d(lif_scan(currents, P).flatten(0, 1), k).unflatten(0, shape[:2])
        assert 0 < want.sum() < want.numel()
        last = currents.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, shape[:2])
        weights = torch.randn(want.shape, device=DEVICE)
        for layout in (currents, last):
            for dtype in (torch.float32, torch.bfloat16):
                a = layout.detach().to(dtype).clone(memory_format=torch.preserve_format).requires_grad_(True)
                b = a.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
                got = fused_lif_pool(a, P.k_tau1, P.v_th, P.a, k, dtype)
                assert got.dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last) == (layout is last)
                spikes = fused_lif(b, P.k_tau1, P.v_th, P.a, dtype)  # the same dtype: the same rounded gradients
                unfused = torch.nn.functional.avg_pool2d(spikes.flatten(0, 1), k).unflatten(0, shape[:2])
                assert torch.equal(got, unfused)
                if dtype == torch.float32:  # (bf16 currents are rounded inputs: other spikes than want's)
                    assert torch.equal(got, want)
                (got.float() * weights).sum().backward()
                (unfused.float() * weights).sum().backward()
                assert a.grad.dtype == dtype and a.grad.abs().sum() > 0
                assert torch.equal(a.grad, b.grad), (shape, dtype)
        ref = currents.clone().requires_grad_(True)
        pooled = torch.nn.functional.avg_pool2d(lif_scan(ref, P).flatten(0, 1), k).unflatten(0, shape[:2])
        (pooled * weights).sum().backward()
        c = currents.clone().requires_grad_(True)
        (fused_lif_pool(c, P.k_tau1, P.v_th, P.a, k) * weights).sum().backward()
        torch.testing.assert_close(c.grad, ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, 3)


@pytest.mark.parametrize("path", ZOO, ids=zoo_ids())
def test_zoo_inference_with_the_pool_fused_into_the_lif_gives_the_same_scores(path, monkeypatch):
    """Inference through the fused kernels, with every LIF that feeds a 2x2 pool applying it itself,
    gives the pure-torch scores bit for bit (and under bf16 autocast, the scores of the unpooled kernel)."""
    import snncompile.kernels as kernels

    cfg = tiny_zoo_config(path)
    net = network_from_config(cfg.model).eval().to(DEVICE)
    x = random_input(cfg, 4, torch.Generator().manual_seed(0)).to(DEVICE)
    calibrate_firing(net, x)
    randomize_neunorm(net)
    calls = []
    pooled = kernels.fused_lif_pool
    monkeypatch.setattr(kernels, "fused_lif_pool", lambda *a, **k: calls.append(1) or pooled(*a, **k))
    scores = {}
    with torch.no_grad():
        for fused in (False, True):
            net.fused_lif = fused
            scores[fused] = net(x)
        assert torch.equal(scores[True], scores[False])
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            net.fused_lif = True
            with_pool = net(x)
            monkeypatch.setattr(kernels, "fused_lif_pool", None)  # would fail if called
            monkeypatch.setattr("snncompile.models._fuses_into_lif", lambda pool, dtype: False)
            without = net(x)
        assert torch.equal(with_pool, without)
    pools_after_lif = sum(isinstance(a, LIFCell) and isinstance(b, torch.nn.AvgPool2d)
                          for a, b in zip(net.stages, list(net.stages)[1:]))
    assert len(calls) == 2 * pools_after_lif  # fp32 and bf16 passes
    if "bench-" in str(path):  # no NeuNorm between their LIFs and pools: the fused pool must have run
        assert pools_after_lif == 2


COMPILE_FOR_SM90 = '''
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from snncompile.kernels import _triton as K
from snncompile.kernels.input_conv import conv_tile
from snncompile.kernels.lif import _NO_FMA, pool_block, pool_forward_warps, recompute_block
from snncompile.kernels.neunorm import tile_shape

def signature(fn, ptrs):
    args = inspect.signature(fn.fn).parameters
    floats = {"k_tau1", "v_th", "half_a", "inv_a", "v_over_f"}
    return {a: ptrs.get(a) or ("constexpr" if a.isupper() else "fp32" if a in floats else "i32") for a in args}

variants = []
for cur, out in [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")]:  # lif.py's (currents, spikes)
    for save in (True, False):  # with and without the conv's bias (training passes it whether it saves or not)
        ptrs = {"i_ptr": "*" + cur, "o_ptr": "*" + out, "u_ptr": "*fp32" if save else "*" + out, "b_ptr": "*fp32"}
        variants.append((K.lif_forward, ptrs, {"T": 8, "SAVE_U": save, "HAS_BIAS": save, "BLOCK": 1024}))
        variants += [(K.lif_pool_forward, ptrs, {"T": 8, "K": k, "SAVE_U": save, "CHANNELS_LAST": last,
                                                  "HAS_BIAS": not save, "BLOCK": pool_block(k),
                                                  "num_warps": pool_forward_warps(last)})
                     for k in (2, 4) for last in (False, True)]
# backward: (what u_ptr holds, gradient in, gradient out, bf16 store, membrane recomputed from the currents):
# fp32 training keeps the membrane; bf16 and fp16 keep their currents; the fused input conv hands its own
# recomputed fp32 membrane with a bf16 gradient
for saved, grad, grad_in, bf16, recompute in [("fp32", "fp32", "fp32", False, False), ("fp32", "bf16", "i16", True, False),
                                              ("bf16", "bf16", "i16", True, True), ("fp16", "fp16", "fp32", False, True)]:
    for sum_t in (True, False):  # with and without the bias gradient's sums over T (gb_ptr: fp32 either way)
        ptrs = {"u_ptr": "*" + saved, "gi_ptr": "*" + grad_in, "gb_ptr": "*fp32", "b_ptr": "*fp32"}
        flags = {"T": 8, "T_POW2": 8, "GRAD_BF16": bf16, "SUM_T": sum_t, "RECOMPUTE": recompute, "HAS_BIAS": recompute}
        variants.append((K.lif_backward, {**ptrs, "go_ptr": "*" + grad},
                         {**flags, "BLOCK": recompute_block(8) if recompute else 1024}))
        variants += [(K.lif_pool_backward, {**ptrs, "gp_ptr": "*" + grad},
                      {**flags, "K": k, "CHANNELS_LAST": last,
                       "BLOCK": recompute_block(8, k * k) if recompute else pool_block(k)})
                     for k in (2, 4) for last in (False, True)]
# a T that is not a power of two: the recomputed membranes' register tile has rows no step fills
variants.append((K.lif_pool_backward, {"u_ptr": "*bf16", "gi_ptr": "*i16", "gb_ptr": "*fp32", "b_ptr": "*fp32",
                                       "gp_ptr": "*bf16"},
                 {"T": 5, "T_POW2": 8, "K": 2, "GRAD_BF16": True, "CHANNELS_LAST": True, "SUM_T": True,
                  "RECOMPUTE": True, "HAS_BIAS": True, "BLOCK": recompute_block(5, 4)}))
# the fused input conv + LIF (+ pool): input_conv.py's launches; (spikes, membrane) written: both for verify's
# record, the spikes alone for scores and training's forward, the membrane alone for training's backward
for out, cases in [("fp32", [(2, 2, "o"), (3, 1, "o"), (2, 1, "ou"), (1, 4, "o"), (2, 1, "u"), (3, 1, "u")]),
                   ("bf16", [(2, 2, "o"), (3, 1, "o"), (1, 4, "o")])]:
    for c_in, k, written in cases:  # the layout is in the strides: one variant serves NCHW and channels_last
        save, store = "u" in written, "o" in written
        # a conv of few channels deeper in a network reads 16-bit spikes under autocast
        ptrs = {"x_ptr": "*bf16" if c_in == 1 else "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                "o_ptr": "*" + (out if store else "fp32"), "u_ptr": "*fp32" if save else "*" + out}
        c_block, p_block = conv_tile(128, 34 * 34 // (k * k), k)
        variants.append((K.conv_lif_forward, ptrs, {"T": 8, "K": k, "C_IN": c_in, "KH": 3, "KW": 3, "PAD_H": 1,
                                                    "PAD_W": 1, "SAVE_U": save, "STORE_O": store, "HAS_BIAS": c_in > 1,
                                                    "C_BLOCK": c_block, "P_BLOCK": p_block}))
# NeuNorm's full-size passes (neunorm.py): fp32 maps, tiles of a 32x32 map of 128 channels and an 8x8 one of 1024
for channels, positions in ((128, 32 * 32), (1024, 8 * 8)):
    f_block, p_block = tile_shape(channels, positions)
    tile = {"F_BLOCK": f_block, "P_BLOCK": p_block}
    variants += [(K.neunorm_forward, {"o_ptr": "*fp32", "u_ptr": "*fp32", "x_ptr": "*fp32", "y_ptr": "*fp32"}, dict(tile)),
                 (K.neunorm_channel_dot, {"g_ptr": "*fp32", "u_ptr": "*fp32", "d_ptr": "*fp32"},
                  {"F_BLOCKS": -(-channels // f_block), **tile}),
                 (K.neunorm_backward, {"g_ptr": "*fp32", "x_ptr": "*fp32", "gx_ptr": "*fp32", "go_ptr": "*fp32",
                                       "gu_ptr": "*fp32"},
                  {"T": 8, "U_GRAD": True, **dict(zip(tile, tile_shape(channels, positions, values=1024)))})]
variants.append((K.neunorm_backward, {"g_ptr": "*fp32", "x_ptr": "*fp32", "gx_ptr": "*fp32", "go_ptr": "*fp32",
                                      "gu_ptr": "*fp32"}, {"T": 5, "U_GRAD": False, "F_BLOCK": 8, "P_BLOCK": 128}))
for fn, ptrs, constants in variants:  # with the options every launch in lif.py, input_conv.py and neunorm.py passes
    warps = {"num_warps": constants.pop("num_warps")} if "num_warps" in constants else {}
    compiled = triton.compile(ASTSource(fn, signature(fn, ptrs), constants), target=GPUTarget("cuda", 90, 32),
                              options={**_NO_FMA, **warps})
    assert compiled.asm["cubin"], (fn.__name__, ptrs, constants)
    assert "fma.rn.f32" not in compiled.asm["ptx"], (fn.__name__, ptrs, constants)  # each product rounded alone
# control: Triton's default contracts the backward's products into FMAs, which is what _NO_FMA turns off
fn, ptrs, constants = next(v for v in reversed(variants) if v[0] is K.lif_pool_backward)
default = triton.compile(ASTSource(fn, signature(fn, ptrs), constants), target=GPUTarget("cuda", 90, 32))
assert "fma.rn.f32" in default.asm["ptx"]
print("compiled", len(variants))
'''


def test_every_kernel_variant_compiles_for_an_h100_without_one():
    """The interpreter runs the kernels on numpy and forgives what the compiler rejects (types, casts,
    shapes); so every variant lif.py launches (dtypes, membrane kept or not, 2x2/4x4 pools, bf16 gradient
    store) is compiled ahead of time to an sm_90 cubin here, no GPU needed, in a fresh interpreter
    because this module switched Triton to interpret mode."""
    import subprocess
    import sys

    backends = pytest.importorskip("triton.backends.nvidia")  # ships ptxas with the triton wheel
    assert backends is not None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["compiled", "97"]


def record_launches(monkeypatch, module=None) -> list[tuple[str, dict]]:
    """(kernel name, keyword arguments) of every kernel launch ``module`` (lif.py by default; one with
    ``_KERNELS`` and ``_kernels()``) makes from now on in this test."""
    from snncompile.kernels import lif

    module = module or lif
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "_KERNELS", tuple(Recorder(k) for k in module._kernels()))
    return launches


def test_every_kernel_launch_compiles_without_fma_contraction(monkeypatch):
    """Each launch in lif.py passes ``enable_fp_fusion=False`` (the compile test above shows what that
    option does to the code): with contraction the compiler fused the LIF + 4x4 pool backward's products
    otherwise than the LIF backward's, and on an H200 the two gradients differed in their last bits."""
    from snncompile.kernels import fused_lif_pool

    launches = record_launches(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        currents = (torch.randn(3, 2, 2, 4, 4, device=DEVICE) + 0.3).to(dtype).requires_grad_(True)
        fused_lif(currents, P.k_tau1, P.v_th, P.a, dtype).sum().backward()
        fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, 2, dtype).float().sum().backward()
    options = [kwargs.get("enable_fp_fusion") for _, kwargs in launches]
    assert len(options) >= 8 and set(options) == {False}, options


def test_the_channels_last_pooled_forward_runs_one_warp_per_program(monkeypatch):
    """With channels last, the pooled forward launches one warp per program, so that a window's neurons
    are summed inside a warp (pool_forward_warps: with four, the sum crossed warps through shared memory,
    and the kernel ran 6.75x slower than in NCHW on an H200); NCHW keeps Triton's four. The spikes are the
    same either way (the layouts' test above)."""
    from snncompile.kernels import fused_lif_pool

    launches = record_launches(monkeypatch)
    currents = torch.randn(3, 2, 16, 4, 4, device=DEVICE) + 0.3
    last = currents.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    for layout in (currents, last):
        fused_lif_pool(layout, P.k_tau1, P.v_th, P.a, 2, torch.float32)
    warps = [(kwargs["CHANNELS_LAST"], kwargs["num_warps"]) for name, kwargs in launches if name == "lif_pool_forward"]
    assert warps == [(False, 4), (True, 1)]


@pytest.mark.parametrize("pool", [None, 2])
def test_a_nan_gradient_stays_nan_in_bf16(pool):
    """The kernels' bf16 gradient store rounds fp32 bits by integer arithmetic: a NaN must come out NaN,
    as from torch's cast, also NVIDIA's canonical 0x7FFFFFFF, whose rounding would carry into the sign
    bit and give -0.0 (a NaN loss silently zeroed for every layer below)."""
    from snncompile.kernels import fused_lif_pool

    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32).to(DEVICE)
    currents = torch.full((2, 1, 1, 2, 2), 0.3, device=DEVICE).to(torch.bfloat16).requires_grad_(True)
    spikes = (fused_lif(currents, P.k_tau1, P.v_th, P.a, torch.float32) if pool is None
              else fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, pool, torch.float32))
    spikes.backward(nan.expand_as(spikes).contiguous())
    assert currents.grad.isnan().all(), currents.grad.flatten().tolist()


def test_a_pool_window_past_32x32_fuses_too():
    """A 64x64 window is more than the 1024 neurons a program of the pooled kernels takes: one output
    per program then (the block once came out 0: a ZeroDivisionError at launch)."""
    from snncompile.kernels import fused_lif_pool

    currents = (torch.randn(2, 1, 2, 64, 64, device=DEVICE) + 0.4).requires_grad_(True)
    reference = currents.detach().clone().requires_grad_(True)
    pooled = fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, 64)
    expected = torch.nn.functional.avg_pool2d(lif_scan(reference, P).flatten(0, 1), 64).unflatten(0, (2, 1))
    assert torch.equal(pooled, expected)
    pooled.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(currents.grad, reference.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_inference_with_a_bias_parameter_keeps_no_membrane(monkeypatch, no_autograd):
    """Outside autograd the forward kernels write spikes only, even with the bias a Parameter (which
    requires grad) handed to them: the fp32 membrane, a full-size write, is for backward."""
    from snncompile.kernels import fused_lif_pool

    launches = record_launches(monkeypatch)
    currents = torch.randn(3, 2, 4, 4, 4, device=DEVICE) + 0.3
    bias = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    with no_autograd():
        fused_lif(currents, P.k_tau1, P.v_th, P.a, bias=bias)
        fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, 2, bias=bias)
    assert [(name, kwargs["SAVE_U"]) for name, kwargs in launches] == [("lif_forward", False),
                                                                       ("lif_pool_forward", False)]
    launches.clear()
    fused_lif(currents, P.k_tau1, P.v_th, P.a, bias=bias)  # with autograd: kept for the bias's gradient
    assert [kwargs["SAVE_U"] for _, kwargs in launches] == [True]


def test_kernel_entry_points_refuse_tensors_past_32_bit_indexing(monkeypatch):
    """Called directly, a fused kernel given 2^31 or more elements raises instead of indexing wrong memory
    (the limit lowered to this tensor's size: 2^31 elements cannot be allocated in a test)."""
    from snncompile.kernels import fused_lif_inference, fused_lif_pool, lif

    assert lif.INDEX_LIMIT == 2**31
    currents = torch.randn(2, 1, 1, 4, 4, device=DEVICE)
    monkeypatch.setattr(lif, "INDEX_LIMIT", currents.numel())
    for call in (lambda: fused_lif(currents, P.k_tau1, P.v_th, P.a), lambda: fused_lif_inference(currents, P.k_tau1, P.v_th),
                 lambda: fused_lif_pool(currents, P.k_tau1, P.v_th, P.a, 2)):
        with pytest.raises(ValueError, match="index in 32 bits: 32 elements >= 2\\^31"):
            call()
    monkeypatch.setattr(lif, "INDEX_LIMIT", currents.numel() + 1)
    assert torch.equal(fused_lif(currents, P.k_tau1, P.v_th, P.a), lif_scan(currents, P))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "features"])
def test_the_fused_kernels_add_a_conv_bias_per_channel(layout):
    """fused_lif / fused_lif_pool with ``bias``: spikes bit for bit those of the LIF over currents + bias
    (added in fp32), and the gradients of currents and bias those of autograd through that, in fp32 and
    with bf16 currents (whose membrane backward recomputes, bias included)."""
    from snncompile.kernels import fused_lif_pool

    torch.manual_seed(0)
    shape = (3, 2, 5) if layout == "features" else (3, 2, 5, 6, 8)
    base = torch.randn(shape, device=DEVICE) * 0.6 + 0.1
    if layout == "channels_last":
        base = base.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, shape[:2])
    bias = torch.randn(5, device=DEVICE) * 0.3
    view = (1, 1, 5) + (1,) * (len(shape) - 3)
    pools = (None,) if layout == "features" else (None, 2)
    for dtype in (torch.float32, torch.bfloat16):
        for pool in pools:
            a = base.detach().to(dtype).clone(memory_format=torch.preserve_format).requires_grad_(True)
            b = bias.clone().requires_grad_(True)
            a_ref = a.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            b_ref = bias.clone().requires_grad_(True)
            want = lif_scan(a_ref.float() + b_ref.view(view), P)
            if pool is None:
                got = fused_lif(a, P.k_tau1, P.v_th, P.a, torch.float32, bias=b)
            else:
                got = fused_lif_pool(a, P.k_tau1, P.v_th, P.a, pool, torch.float32, bias=b)
                want = torch.nn.functional.avg_pool2d(want.flatten(0, 1), pool).unflatten(0, shape[:2])
            assert 0 < want.sum() < want.numel() and torch.equal(got, want), (dtype, pool)
            weights = torch.randn(want.shape, device=DEVICE)
            (got * weights).sum().backward()
            (want * weights).sum().backward()
            assert b.grad.dtype == torch.float32 and b.grad.abs().sum() > 0
            # bf16: the currents' gradient is stored in bf16, but the bias's sums the kernel's fp32 values
            # (over T in registers, the rest from those sums), so it keeps fp32 accuracy either way
            tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
            torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.grad.float(), a_ref.grad.float(), **tol)
    with pytest.raises(ValueError, match="one value per channel"):
        fused_lif(base, P.k_tau1, P.v_th, P.a, bias=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="one value per channel"):  # no channel dimension at all
        fused_lif(base[:, :, 0, 0, 0] if base.dim() == 5 else base[:, :, 0], P.k_tau1, P.v_th, P.a,
                  bias=torch.zeros(5, device=DEVICE))


def test_layer_major_moves_each_conv_bias_into_the_fused_lif_after_it(monkeypatch):
    """In the fused path a conv/linear whose output goes straight into a LIF runs without its bias and the
    kernel adds it (cuDNN's separate bias add costs a full read and write of the largest tensor); one that
    feeds something else (the output layer), or that someone hooks, keeps it. Same scores either way."""
    from snncompile import models

    cfg = tiny_zoo_config(REPO / "models" / "bench-nmnist.toml")
    net = network_from_config(cfg.model).eval().to(DEVICE)
    x = random_input(cfg, 4, torch.Generator().manual_seed(0)).to(DEVICE)
    calibrate_firing(net, x)
    stripped = []
    real = models._linear_map

    def recorded(stage, h, keep_bias=True, pad_channels=1):
        if not keep_bias:
            stripped.append(stage)
        return real(stage, h, keep_bias, pad_channels)

    monkeypatch.setattr(models, "_linear_map", recorded)
    layers = [s for s in net.stages if isinstance(s, (torch.nn.Conv2d, torch.nn.Linear))]
    scores = {}
    for fused in (False, True):
        net.fused_lif = fused
        with torch.no_grad():
            scores[fused] = net(x)
    assert stripped == layers[:-1]  # every layer but the output layer, which feeds no LIF
    assert torch.equal(scores[False], scores[True])
    net.pad_conv_channels = 8  # the 2-channel input conv padded as well, still without its bias
    stripped.clear()
    with torch.no_grad():
        torch.testing.assert_close(net(x), scores[False], rtol=1e-5, atol=1e-5)
    assert stripped == layers[:-1]
    net.pad_conv_channels = 1
    stripped.clear()
    layers[0].register_forward_hook(lambda *args: None)
    with torch.no_grad():
        assert torch.equal(net(x), scores[False])
    assert stripped == layers[1:-1]


def test_split_tf32_layers_hand_their_bias_to_the_fused_lif_too(monkeypatch):
    """torch-fast's tf32x2 layers (W_hi x + W_lo x, then the bias) move their bias into the fused LIF as
    plain layers do: the kernel adds it to hi + lo, the same fp32 addition, so the scores keep their bits.
    The output layer, which feeds no LIF, still adds its own."""
    from snncompile.split_tf32 import SplitTF32, apply_split_tf32

    cfg = tiny_zoo_config(REPO / "models" / "bench-nmnist.toml")
    net = network_from_config(cfg.model).eval().to(DEVICE)
    x = random_input(cfg, 4, torch.Generator().manual_seed(0)).to(DEVICE)
    calibrate_firing(net, x)
    assert apply_split_tf32(net) == 3  # the second conv, the hidden FC and the readout read spikes
    split = [s for s in net.stages if isinstance(s, SplitTF32)]
    with_bias = []
    real = SplitTF32.forward
    monkeypatch.setattr(SplitTF32, "forward", lambda layer, h: with_bias.append(layer) or real(layer, h))
    scores = {}
    for fused in (False, True):
        with_bias.clear()
        net.fused_lif = fused
        with torch.no_grad():
            scores[fused] = net(x)
    assert with_bias == split[-1:]  # fused: only the readout ran with its bias
    assert torch.equal(scores[False], scores[True])


def test_bf16_backward_reruns_the_recurrence_inside_the_backward_kernel(monkeypatch):
    """With 16-bit currents kept, backward is one kernel launch per LIF (RECOMPUTE, the T membranes in
    registers): no forward kernel writes an fp32 membrane for it. The gradients are bit for bit those of
    the same currents in fp32, whose membrane autograd keeps; the bias, a strided view here, is added as the
    forward added it. T = 5 leaves register rows unfilled."""
    from snncompile.kernels import fused_lif_pool

    launches = record_launches(monkeypatch)
    base = (torch.randn(5, 2, 3, 4, 4, device=DEVICE) * 0.6 + 0.2).to(torch.bfloat16)
    weights = torch.randn(5, 2, 3, 4, 4, device=DEVICE)
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        plain, pooled = (base.to(dtype, copy=True).requires_grad_(True) for _ in range(2))
        full = torch.tensor([0.3, -0.2, 9.0, 0.1, 7.0, -0.3], device=DEVICE).requires_grad_(True)
        bias = full[::2]  # 0.3, 9.0, 7.0: a channel read from the wrong place would fire otherwise
        out = ((fused_lif(plain, P.k_tau1, P.v_th, P.a, torch.float32, bias=bias) * weights).sum()
               + (fused_lif_pool(pooled, P.k_tau1, P.v_th, P.a, 2, torch.float32, bias=bias)
                  * weights[..., ::2, ::2]).sum())
        del launches[:]
        out.backward()
        grads[dtype] = (plain.grad, pooled.grad, full.grad,
                        sorted((name, kw["RECOMPUTE"], kw["HAS_BIAS"]) for name, kw in launches))
    (*g16, b16, launched16), (*g32, b32, launched32) = grads[torch.bfloat16], grads[torch.float32]
    assert launched16 == [("lif_backward", True, True), ("lif_pool_backward", True, True)]
    assert launched32 == [("lif_backward", False, False), ("lif_pool_backward", False, False)]
    for half, single in zip(g16, g32):
        assert half.abs().sum() > 0 and torch.equal(half, single.to(torch.bfloat16))
    torch.testing.assert_close(b16, b32, rtol=1e-6, atol=1e-6)


def test_past_t_32_autograd_keeps_the_membrane_rather_than_recompute_it_in_registers():
    from snncompile.kernels.lif import recomputes_in_registers
    from snncompile.memory import SavedActivations

    assert recomputes_in_registers(32) and not recomputes_in_registers(33)
    currents = (torch.randn(33, 1, 6, device=DEVICE) + 0.3).to(torch.bfloat16).requires_grad_(True)
    with SavedActivations() as saved:
        spikes = fused_lif(currents, P.k_tau1, P.v_th, P.a)
    assert saved.saved_bytes == currents.numel() * 4  # the fp32 membrane
    spikes.sum().backward()
    full = currents.detach().float().requires_grad_(True)
    fused_lif(full, P.k_tau1, P.v_th, P.a).sum().backward()
    assert torch.equal(currents.grad, full.grad.to(torch.bfloat16))


def neunorm_case(layout: str, steps: int = 3, batch: int = 2, channels: int = 37, height: int = 7, width: int = 5):
    """A NeuNorm of random U and 0/1 spikes ``[T, B, F, H, W]`` in ``layout`` ('nchw', or 'last': each step
    channels_last, as channels_last convolutions leave them); 37 channels and 7x5 positions fill no tile."""
    from snncompile.layers import NeuNorm

    gen = torch.Generator().manual_seed(0)
    norm = NeuNorm(channels, height, width, k_tau2=0.9).to(DEVICE)
    with torch.no_grad():
        norm.u_scale.copy_(torch.randn(channels, height, width, generator=gen))
    spikes = (torch.rand(steps, batch, channels, height, width, generator=gen) < 0.3).float().to(DEVICE)
    if layout == "last":
        spikes = spikes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return norm, spikes


@pytest.mark.parametrize("layout", ["nchw", "last"])
def test_fused_neunorm_gives_neunorms_bits_and_autograds_gradients(layout):
    """The fused NeuNorm's output equals NeuNorm.forward's bit for bit, in the input's layout; the spikes'
    and U's gradients equal autograd's through it to fp32 summation order, the spikes' in their layout (the
    incoming gradient is NCHW: channels_last copies it once); with U frozen, the spikes' alone."""
    from snncompile.kernels.neunorm import fused_neunorm

    norm, spikes = neunorm_case(layout)
    grads = {}
    outputs = {}
    weight = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for fused in (False, True):
        x = spikes.clone().requires_grad_(True)
        norm.u_scale.grad = None
        y = fused_neunorm(x, norm) if fused else norm(x)
        (y * weight).sum().backward()
        outputs[fused], grads[fused] = y.detach(), (x.grad, norm.u_scale.grad.clone())
    assert torch.equal(outputs[True], outputs[False]) and outputs[True].stride() == spikes.stride()
    assert outputs[True].ne(spikes).any()  # U * x is not zero: the test would see a missing term
    assert grads[True][0].stride() == spikes.stride()
    for fused_grad, reference in zip(grads[True], grads[False]):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(fused_grad, reference, rtol=1e-5, atol=1e-6)
    norm.u_scale.requires_grad_(False)
    norm.u_scale.grad = None  # a gradient written now would be the frozen pass's
    x = spikes.clone().requires_grad_(True)
    (fused_neunorm(x, norm) * weight).sum().backward()
    assert norm.u_scale.grad is None
    torch.testing.assert_close(x.grad, grads[False][0], rtol=1e-5, atol=1e-6)


def test_fused_neunorm_launches_compile_without_fma_contraction_and_keep_nothing_full_size(monkeypatch):
    """Each NeuNorm launch passes enable_fp_fusion=False (the output's o - U * x rounds twice, as in torch);
    backward gets x [T, B, H*W] and U from the forward, nothing of the spikes' size."""
    from snncompile.kernels import neunorm

    launches = record_launches(monkeypatch, neunorm)
    norm, spikes = neunorm_case("nchw")
    x = spikes.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = neunorm.fused_neunorm(x, norm)
    y.sum().backward()
    assert [name for name, _ in launches] == ["neunorm_forward", "neunorm_channel_dot", "neunorm_backward"]
    assert {kwargs.get("enable_fp_fusion") for _, kwargs in launches} == {False}
    assert saved and max(saved) < spikes.numel() // 4
