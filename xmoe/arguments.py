"""The checks of every argument a Buffer call takes: ``ValueError`` naming the argument, and the
arguments as the kernels take them. Importing this module loads no kernel code."""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe import runtime
from xmoe.device_memory import empty, kernel_view, xp
from xmoe.ep.handle import DispatchHandle, Routing
from xmoe.interop import FLOAT8_E4M3, Origin, as_array, dtype_name
from xmoe.layout.symmetric import FP8_GROUP, MAX_LOCAL_EXPERTS

#: Payloads of dispatch and combine; an FP8 dispatch takes ``(float8_e4m3fn rows, float32 scales)``.
PAYLOAD_DTYPES = ("float32", "bfloat16")


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an int ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: must be an int >= {low}")
    return int(value)


def check_array(array: Any, origin: Origin, name: str, dtype: Any, shape: tuple[int | None, ...],
                meaning: str = "") -> None:
    """``ValueError`` naming ``name`` unless ``array`` has ``dtype`` and ``shape`` (None: any size);
    ``meaning`` says what the expected sizes are."""
    if origin.dtype != dtype_name(dtype):
        raise ValueError(f"{name}: expected dtype {dtype_name(dtype)}, got {origin.dtype}")
    if len(array.shape) != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {wanted}, got {list(array.shape)}{meaning}")


def check_payload(array: Any, origin: Origin, name: str, rows: int | None = None, meaning: str = "") -> None:
    if origin.dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {origin.dtype}")
    check_array(array, origin, name, origin.dtype, (rows, None), meaning)


def as_group(group: Any) -> runtime.Group:
    """``group`` as the :class:`xmoe.Group`: itself, or for a ``torch.distributed`` process group of
    every rank the group ``xmoe.init()`` returns; ``ValueError`` for anything else."""
    if isinstance(group, runtime.Group):
        runtime.get_group()
        return group
    if type(group).__module__.split(".")[0] == "torch" and hasattr(group, "size") and hasattr(group, "rank"):
        xgroup = runtime.init()
        if (group.size(), group.rank()) != (xgroup.world_size, xgroup.rank):
            raise ValueError(f"group: a torch.distributed group of rank {group.rank()} of {group.size()}; xmoe's "
                             f"Buffer spans every rank ({xgroup.rank} of {xgroup.world_size})")
        return xgroup
    runtime.get_group()
    raise ValueError(f"group: expected the xmoe.Group that xmoe.init() returned or a torch.distributed process "
                     f"group, got {type(group).__name__}")


def check_handle(handle: Any) -> None:
    if not isinstance(handle, DispatchHandle):
        raise ValueError(f"handle: expected the DispatchHandle a dispatch returned, got {type(handle).__name__}")


def num_local_experts(num_experts: Any, num_ranks: int) -> int:
    """Experts per rank of ``num_experts`` over ``num_ranks``; ``ValueError`` unless they split evenly and fit."""
    num_experts = check_int("num_experts", num_experts, 1)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} is not divisible by the {num_ranks} ranks")
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts={num_experts}: at most {MAX_LOCAL_EXPERTS} experts per rank")
    return num_experts // num_ranks


def dispatch_payload(x: Any) -> tuple[Any, Any, Origin]:
    """``x`` checked, as kernel arrays: the rows, their FP8 scales (``[tokens, 0]`` without FP8)
    and the rows' origin."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"x: expected a tensor or a (float8_e4m3fn rows, float32 scales) pair, got a tuple "
                             f"of {len(x)}")
        payload, origin = as_array(x[0], "x[0]", raw=True)
        check_array(payload, origin, "x[0]", FLOAT8_E4M3, (None, None), " (FP8 rows)")
        tokens, hidden = payload.shape
        if hidden % FP8_GROUP:
            raise ValueError(f"x[0]: hidden {hidden} is not a multiple of {FP8_GROUP} (one scale per "
                             f"{FP8_GROUP} channels)")
        scales, scales_origin = as_array(x[1], "x[1]", raw=True)
        check_array(scales, scales_origin, "x[1]", np.float32, (tokens, hidden // FP8_GROUP),
                     " (one scale per token per 128 channels)")
        return payload, scales, origin
    payload, origin = as_array(x, "x", raw=True)
    check_payload(payload, origin, "x")
    return payload, empty((payload.shape[0], 0), np.float32), origin


def check_cached(handle: Any, num_tokens: int, num_ranks: int, **others: Any) -> None:
    """``ValueError`` unless ``handle`` is a dispatch's handle routing ``num_tokens`` over ``num_ranks``,
    and none of ``others`` (the arguments a cached dispatch does not take) was passed."""
    check_handle(handle)
    passed = [name for name, value in others.items() if value is not None]
    if passed:
        raise ValueError(f"{', '.join(passed)}: not taken with handle= (cached dispatch repeats the handle's routing)")
    if handle.is_token_in_rank.shape != (num_tokens, num_ranks):
        raise ValueError(f"x: {num_tokens} tokens, but the handle routes {handle.is_token_in_rank.shape[0]} tokens "
                         f"over {handle.is_token_in_rank.shape[1]} ranks")


def check_routing(num_tokens: int, num_ranks: int, num_tokens_per_rank: Any, is_token_in_rank: Any,
            num_tokens_per_expert: Any, topk_idx: Any, topk_weights: Any) -> tuple[Routing, int]:
    """The routing arguments of a dispatch without a handle, checked, as kernel arrays, and
    the experts per rank."""
    missing = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                        ("is_token_in_rank", is_token_in_rank),
                                        ("num_tokens_per_expert", num_tokens_per_expert)) if value is None]
    if missing:
        raise ValueError(f"{', '.join(missing)}: required without handle= (from get_dispatch_layout)")
    ranks = num_ranks
    tokens = f" (x's {num_tokens} tokens)"
    if topk_idx is not None:
        idx, origin = as_array(topk_idx, "topk_idx", raw=True)
        check_array(idx, origin, "topk_idx", np.int64, (num_tokens, None), tokens)
    else:
        idx = kernel_view(xp().empty((num_tokens, 0), np.int64))
    per_rank, origin = as_array(num_tokens_per_rank, "num_tokens_per_rank", raw=True)
    check_array(per_rank, origin, "num_tokens_per_rank", np.int32, (ranks,), f" ({ranks} ranks)")
    in_rank, origin = as_array(is_token_in_rank, "is_token_in_rank", raw=True)
    check_array(in_rank, origin, "is_token_in_rank", np.bool_, (num_tokens, ranks),
                f" (x's {num_tokens} tokens, {ranks} ranks)")
    expert_counts, origin = as_array(num_tokens_per_expert, "num_tokens_per_expert", raw=True)
    check_array(expert_counts, origin, "num_tokens_per_expert", np.int32, (None,))
    experts_per_rank = num_local_experts(expert_counts.shape[0], ranks)
    if topk_weights is not None:
        if topk_idx is None:
            raise ValueError("topk_weights: passed without topk_idx")
        weights, origin = as_array(topk_weights, "topk_weights", raw=True)
        check_array(weights, origin, "topk_weights", np.float32, idx.shape, " (topk_idx's)")
    else:
        weights = kernel_view(xp().zeros(idx.shape, np.float32))
    return Routing(in_rank, expert_counts, idx, weights), experts_per_rank
