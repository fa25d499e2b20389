"""xmoe.moe and xmoe.fused_moe (the same contract, one kernel) against the NumPy layer: a world
of one, 2 and 4 ranks with ragged token counts, shared experts, a rank with no tokens; the
fused layer also on 8 ranks, with tiles of a few rows, every token to one expert, a capacity
factor that drops rows, and MoELayer(fused=True)."""

from __future__ import annotations

import numpy as np
import pytest

from xmoe import reference
from xmoe.demo import backend_io
from xmoe.interop import BFLOAT16

HIDDEN, FFN, TOPK = 64, 32, 2


def weights(seed: int, num_experts: int, shared_ffn: int = 0) -> dict:
    """A layer's weights (every expert), scaled so that outputs stay near 1."""
    rng = np.random.default_rng(seed)
    layer = dict(w_router=rng.standard_normal((HIDDEN, num_experts)).astype(BFLOAT16),
                 w_up=(rng.standard_normal((num_experts, 2 * FFN, HIDDEN)) / np.sqrt(HIDDEN)).astype(BFLOAT16),
                 w_down=(rng.standard_normal((num_experts, HIDDEN, FFN)) / np.sqrt(FFN)).astype(BFLOAT16))
    if shared_ffn:
        layer["shared"] = ((rng.standard_normal((2 * shared_ffn, HIDDEN)) / np.sqrt(HIDDEN)).astype(BFLOAT16),
                           (rng.standard_normal((HIDDEN, shared_ffn)) / np.sqrt(shared_ffn)).astype(BFLOAT16))
    return layer


LAYERS = ["moe", "fused_moe"]


def run(group, tokens: list[int], num_experts: int, shared_ffn: int = 0, seed: int = 0, config=None,
        function: str = "moe") -> None:
    import xmoe

    to_device, to_host = backend_io()
    me, ranks = (group.rank, group.world_size) if group is not None else (0, 1)
    layer = weights(seed, num_experts, shared_ffn)
    rng = np.random.default_rng(seed + 100)
    xs = [rng.standard_normal((n, HIDDEN)).astype(BFLOAT16) for n in tokens]
    local = num_experts // ranks
    mine = slice(me * local, (me + 1) * local)
    shared = tuple(to_device(w) for w in layer["shared"]) if shared_ffn else None
    y = getattr(xmoe, function)(to_device(xs[me]), to_device(layer["w_router"]), to_device(layer["w_up"][mine]),
                                to_device(layer["w_down"][mine]), TOPK, group=group, shared=shared, config=config)
    want = reference.moe(xs, layer["w_router"], layer["w_up"], layer["w_down"], TOPK,
                         shared=layer.get("shared"))[me]
    got = to_host(y)
    assert got.dtype == BFLOAT16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("function", LAYERS)
def test_moe_world_of_one(function):
    """No group: the router, the experts and the sum back, with and without shared experts."""
    run(None, [24], 8, function=function)
    run(None, [17], 8, shared_ffn=48, seed=1, function=function)


def test_moe_aux_losses():
    """return_aux: the Switch load-balancing loss and the z-loss of the router, against float64 NumPy."""
    import xmoe

    to_device, to_host = backend_io()
    layer = weights(3, 8)
    x = np.random.default_rng(4).standard_normal((40, HIDDEN)).astype(BFLOAT16)
    y, balance, z_loss = xmoe.moe(to_device(x), to_device(layer["w_router"]), to_device(layer["w_up"]),
                                  to_device(layer["w_down"]), TOPK, return_aux=True)
    want = reference.moe_aux_losses(x, layer["w_router"], TOPK)
    assert to_host(y).shape == x.shape
    np.testing.assert_allclose((balance, z_loss), want, rtol=1e-4)
    assert xmoe.moe(to_device(x[:0]), to_device(layer["w_router"]), to_device(layer["w_up"]),
                    to_device(layer["w_down"]), TOPK, return_aux=True)[1:] == (0.0, 0.0)


@pytest.mark.parametrize("function", LAYERS)
@pytest.mark.parametrize("ranks", [pytest.param(2, marks=pytest.mark.mpi(ranks=2)),
                                   pytest.param(4, marks=pytest.mark.mpi(ranks=4))])
def test_moe_across_ranks(group, ranks, function):
    """Each rank its own token count (one rank none), its own experts; shared experts on top."""
    run(group, [9 + 5 * r for r in range(ranks)], 4 * ranks, function=function)
    run(group, [0] + [11] * (ranks - 1), 4 * ranks, shared_ffn=16, seed=2, function=function)


@pytest.mark.mpi(ranks=8)
def test_fused_moe_on_eight_ranks(group):
    """The fused layer on 8 ranks, one expert each (a rank without tokens among them)."""
    run(group, [4, 0, 3, 5, 2, 6, 1, 4], 8, function="fused_moe")


def one_expert_router(num_experts: int) -> np.ndarray:
    """A router under which every token of positive inputs picks expert 0 first."""
    w_router = np.random.default_rng(9).standard_normal((HIDDEN, num_experts)) / HIDDEN
    w_router[:, 0] = 1.0
    return w_router.astype(BFLOAT16)


@pytest.mark.parametrize("ranks", [pytest.param(1), pytest.param(2, marks=pytest.mark.mpi(ranks=2))])
def test_fused_tiles_of_a_few_rows(group, ranks):
    """The handle API with 4-row tiles: cells of several tiles (the last one partial), cells
    with none, every token to expert 0 (its cells fill up tile after tile), and forwards of
    fewer tokens than the handle holds, repeated on one handle."""
    import xmoe.fused

    to_device, to_host = backend_io()
    me = group.rank if ranks > 1 else 0
    layer = weights(11, 8)
    handle = xmoe.fused.initialize(group if ranks > 1 else None, HIDDEN, FFN, 8, TOPK, 30, block_m=4)
    local = slice(me * 8 // ranks, (me + 1) * 8 // ranks)
    for seed, tokens, w_router in ((1, [30, 30], layer["w_router"]), (2, [13, 0], layer["w_router"]),
                                   (3, [30, 21], one_expert_router(8))):
        rng = np.random.default_rng(seed)
        xs = [np.abs(rng.standard_normal((n, HIDDEN))).astype(BFLOAT16) for n in tokens[:ranks]]
        y = xmoe.fused.forward(handle, to_device(xs[me]), to_device(w_router), to_device(layer["w_up"][local]),
                               to_device(layer["w_down"][local]))
        want = reference.moe(xs, w_router, layer["w_up"], layer["w_down"], TOPK)[me]
        np.testing.assert_allclose(to_host(y).astype(np.float32), want.astype(np.float32), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="31 tokens, more than the handle's max_tokens=30"):
        xmoe.fused.forward(handle, to_device(np.ones((31, HIDDEN), BFLOAT16)), to_device(layer["w_router"]),
                           to_device(layer["w_up"][local]), to_device(layer["w_down"][local]))
    with pytest.raises(ValueError, match="the handle was made for 64, 8, 32"):
        xmoe.fused.forward(handle, to_device(np.ones((3, HIDDEN), BFLOAT16)), to_device(layer["w_router"]),
                           to_device(layer["w_up"][local][:, :FFN]), to_device(layer["w_down"][local][:, :, :FFN // 2]))
    xmoe.fused.finalize(handle)


@pytest.mark.mpi(ranks=2)
def test_moe_in_chunks(group):
    """Config(num_chunks=n): dispatch of chunk i + 1 beside the experts of chunk i give the same
    layer, with more chunks than one rank's tokens (its later chunks are empty) and shared experts."""
    import xmoe

    run(group, [13, 2], 8, config=xmoe.Config(num_chunks=3))
    run(group, [16, 9], 8, shared_ffn=16, seed=3, config=xmoe.Config(num_chunks=4))


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((4, HIDDEN), np.float32)), "x: expected dtype bfloat16"),
    (dict(w_up=np.zeros((3, 2 * FFN, HIDDEN), BFLOAT16)), r"w_up: expected shape \[8, \*, 64\]"),
    (dict(w_down=np.zeros((8, HIDDEN, FFN + 8), BFLOAT16)), r"w_down: expected shape \[8, 64, 32\]"),
    (dict(w_router=np.zeros((HIDDEN + 8, 8), BFLOAT16)), r"w_router: expected shape \[64, \*\]"),
    (dict(top_k=0), "top_k=0"),
    (dict(shared=(np.zeros((16, HIDDEN), BFLOAT16),)), "shared: expected"),
    (dict(config="chunks"), "config: expected an xmoe.Config"),
    (dict(config="num_chunks=0"), r"config.num_chunks=0: must be an int >= 1"),
])
def test_moe_bad_input(change, message):
    """Wrong dtypes and shapes raise ValueError naming the argument (a world of one)."""
    import xmoe

    to_device, _ = backend_io()
    layer = weights(0, 8)
    args = dict(x=np.ones((4, HIDDEN), BFLOAT16), w_router=layer["w_router"], w_up=layer["w_up"],
                w_down=layer["w_down"], top_k=TOPK, shared=None) | change
    if args.get("config") == "num_chunks=0":
        args["config"] = xmoe.Config(num_chunks=0)
    tensors = {k: to_device(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    if isinstance(tensors["shared"], tuple):
        tensors["shared"] = tuple(to_device(w) for w in tensors["shared"])
    with pytest.raises(ValueError, match=message):
        xmoe.moe(tensors.pop("x"), tensors.pop("w_router"), tensors.pop("w_up"), tensors.pop("w_down"),
                 tensors.pop("top_k"), **tensors)


def hf_state(layer: dict, to_device, prefix: str = "mlp.") -> dict:
    """``layer``'s weights under a Hugging Face MoE block's names (DeepSeek-V3's shared experts)."""
    state = {prefix + "gate.weight": to_device(np.ascontiguousarray(layer["w_router"].T))}
    for e in range(layer["w_up"].shape[0]):
        state[f"{prefix}experts.{e}.gate_proj.weight"] = to_device(np.ascontiguousarray(layer["w_up"][e, :FFN]))
        state[f"{prefix}experts.{e}.up_proj.weight"] = to_device(np.ascontiguousarray(layer["w_up"][e, FFN:]))
        state[f"{prefix}experts.{e}.down_proj.weight"] = to_device(layer["w_down"][e])
    if "shared" in layer:
        width = layer["shared"][1].shape[1]
        state[prefix + "shared_experts.gate_proj.weight"] = to_device(np.ascontiguousarray(layer["shared"][0][:width]))
        state[prefix + "shared_experts.up_proj.weight"] = to_device(np.ascontiguousarray(layer["shared"][0][width:]))
        state[prefix + "shared_experts.down_proj.weight"] = to_device(layer["shared"][1])
    return state


def test_fused_capacity_factor_drops_rows_past_the_capacity():
    """Every token to expert 0, top-1, a cell of 4 rows (capacity_factor 1: 10 tokens / 8 experts,
    rounded up to a tile): 4 tokens get the reference output, the other 6 are dropped (zero)."""
    import xmoe.fused

    to_device, to_host = backend_io()
    layer = weights(12, 8)
    handle = xmoe.fused.initialize(None, HIDDEN, FFN, 8, 1, 10, block_m=4, capacity_factor=1.0)
    assert handle.layout.capacity == 4
    x = np.abs(np.random.default_rng(13).standard_normal((10, HIDDEN))).astype(BFLOAT16)
    w_router = one_expert_router(8)
    y = to_host(xmoe.fused.forward(handle, to_device(x), to_device(w_router), to_device(layer["w_up"]),
                                   to_device(layer["w_down"]))).astype(np.float32)
    want = reference.moe([x], w_router, layer["w_up"], layer["w_down"], 1)[0].astype(np.float32)
    kept = np.abs(y).max(axis=1) > 0
    assert kept.sum() == 4 and (y[~kept] == 0).all()
    np.testing.assert_allclose(y[kept], want[kept], rtol=2e-2, atol=2e-2)
    xmoe.fused.finalize(handle)


def check_layer(group, ranks: int, fused: bool = False) -> None:
    """MoELayer: its own weights give moe()'s (fused_moe()'s) result; weights loaded from a Hugging
    Face state dict (router transposed, gate and up stacked, shared experts) give the reference layer's."""
    import xmoe

    to_device, to_host = backend_io()
    me = group.rank if group is not None else 0
    layer = xmoe.MoELayer(HIDDEN, FFN, 8 * ranks, TOPK, group=group, num_shared_experts=2, shared_ffn=16,
                          fused=fused)
    x = np.random.default_rng(7 + me).standard_normal((10, HIDDEN)).astype(BFLOAT16)
    direct = (xmoe.fused_moe if fused else xmoe.moe)(to_device(x), layer.w_router, layer.w_up, layer.w_down, TOPK,
                                                     group=group, shared=layer.shared)
    np.testing.assert_array_equal(to_host(layer(to_device(x))).view(np.uint16), to_host(direct).view(np.uint16))
    weights_ = weights(5, 8 * ranks, shared_ffn=32)
    layer.load_state_dict(hf_state(weights_, to_device), prefix="mlp.")
    xs = [np.random.default_rng(7 + r).standard_normal((10, HIDDEN)).astype(BFLOAT16) for r in range(ranks)]
    want = reference.moe(xs, weights_["w_router"], weights_["w_up"], weights_["w_down"], TOPK,
                         shared=weights_["shared"])[me]
    np.testing.assert_allclose(to_host(layer(to_device(x))).astype(np.float32), want.astype(np.float32), rtol=2e-2,
                               atol=2e-2)
    with pytest.raises(KeyError, match="mlp.gate.weight"):
        layer.load_state_dict({}, prefix="mlp.")


@pytest.mark.parametrize("fused", [False, True])
def test_moe_layer_world_of_one(fused):
    check_layer(None, 1, fused)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.mpi(ranks=2)
def test_moe_layer_two_ranks(group, fused):
    check_layer(group, 2, fused)
