"""``xmoe.MoELayer``: one MoE layer that holds this rank's weights on the device and runs
:func:`xmoe.moe` (or, with ``fused=True``, :func:`xmoe.fused_moe`) on them."""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe.arguments import as_group, check_int
from xmoe.config import Config
from xmoe.device_memory import on_gpu, xp
from xmoe.interop import BFLOAT16, Origin, as_array, to_origin
from xmoe.moe import check_config_for_backend, moe


class MoELayer:
    """An MoE layer that holds this rank's weights on the device: ``layer(x)`` is :func:`moe`.

    Args:
        hidden, ffn: the model's and each expert's width (multiples of 8).
        num_experts: experts in total (a multiple of the ranks); top_k: experts per token.
        group: as :func:`moe` takes it (None: a world of one).
        num_shared_experts, shared_ffn: shared experts, run as one dense SwiGLU MLP of width
            ``num_shared_experts * shared_ffn`` (``shared_ffn`` None: ``ffn``).
        framework: the tensors the weights are held as ("torch" or "jax" on the GPU, "numpy" on
            the simulator; None: "torch" on the GPU, "numpy" on the simulator).
        seed: of the random initial weights (normal, scaled by 1 / sqrt(fan in)).
        config: as :func:`moe` takes it (``num_chunks`` among others).
        fused: run the forward as :func:`xmoe.fused_moe` (one kernel for dispatch, experts and
            combine), with ``capacity_factor`` as it takes it.
        **routing: ``scoring``, ``bias``, ``n_group``, ``topk_group``, ``renormalize``, ``scaling``
            as :func:`moe` takes them.

    Attributes:
        w_router bfloat16 ``[hidden, experts]``, w_up ``[local experts, 2 * ffn, hidden]``, w_down
        ``[local experts, hidden, ffn]``, shared: ``(up [2 * width, hidden], down [hidden, width])`` or None.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, group: Any = None,
                 num_shared_experts: int = 0, shared_ffn: int | None = None, framework: str | None = None,
                 seed: int = 0, config: Config | None = None, fused: bool = False,
                 capacity_factor: float | None = None, **routing: Any) -> None:
        self.group = None if group is None else as_group(group)
        ranks, rank = (1, 0) if self.group is None else (self.group.world_size, self.group.rank)
        self.hidden, self.ffn, self.num_experts, self.top_k = (check_int(name, value, 1) for name, value in (
            ("hidden", hidden), ("ffn", ffn), ("num_experts", num_experts), ("top_k", top_k)))
        if num_experts % ranks:
            raise ValueError(f"num_experts={num_experts} does not split evenly over {ranks} ranks")
        self.num_local_experts = num_experts // ranks
        self.framework = framework or ("torch" if on_gpu() else "numpy")
        self.routing = routing
        self.config = check_config_for_backend(config)
        self.fused, self.capacity_factor = bool(fused), capacity_factor
        rng = np.random.default_rng(seed)
        local = slice(rank * self.num_local_experts, (rank + 1) * self.num_local_experts)
        self.w_router = self._tensor(rng.standard_normal((hidden, num_experts)) / np.sqrt(hidden))
        self.w_up = self._tensor((rng.standard_normal((num_experts, 2 * ffn, hidden)) / np.sqrt(hidden))[local])
        self.w_down = self._tensor((rng.standard_normal((num_experts, hidden, ffn)) / np.sqrt(ffn))[local])
        width = check_int("num_shared_experts", num_shared_experts, 0) * (shared_ffn or ffn)
        self.shared = None if not width else (
            self._tensor(rng.standard_normal((2 * width, hidden)) / np.sqrt(hidden)),
            self._tensor(rng.standard_normal((hidden, width)) / np.sqrt(width)))

    def _tensor(self, values: np.ndarray) -> Any:
        """``values`` as a bfloat16 tensor of the layer's framework, on the device."""
        return self._hold(xp().asarray(np.ascontiguousarray(values.astype(BFLOAT16)).view(np.uint16)))

    def _hold(self, bits: Any) -> Any:
        """Backend bfloat16 bits as a contiguous bfloat16 tensor of the layer's framework."""
        return to_origin(xp().ascontiguousarray(bits), Origin(self.framework, "bfloat16"), "bfloat16")

    def forward(self, x: Any, return_aux: bool = False) -> Any:
        """:func:`moe` of this rank's tokens ``x`` (bfloat16 ``[tokens, hidden]``) with the layer's weights."""
        if self.fused:
            from xmoe.fused import fused_moe

            if return_aux:
                raise ValueError("return_aux=True: the fused layer returns no auxiliary losses yet")
            return fused_moe(x, self.w_router, self.w_up, self.w_down, self.top_k, group=self.group,
                             shared=self.shared, capacity_factor=self.capacity_factor, config=self.config,
                             **self.routing)
        return moe(x, self.w_router, self.w_up, self.w_down, self.top_k, group=self.group, shared=self.shared,
                   return_aux=return_aux, config=self.config, **self.routing)

    __call__ = forward

    def load_state_dict(self, state: dict[str, Any], prefix: str = "") -> None:
        """Take the weights of a Hugging Face Qwen3-MoE or DeepSeek-V3 MoE block (``prefix``, e.g.
        ``"model.layers.3.mlp."``): ``gate.weight`` ``[experts, hidden]`` (the router, transposed
        here), ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj.weight`` of this rank's experts,
        and ``shared_experts.*`` (DeepSeek) or ``shared_expert.*`` (Qwen2-MoE) when the layer has
        shared experts. Any DLPack tensors (bfloat16, on the backend's device); ``KeyError`` naming
        a missing weight."""
        def get(name: str) -> np.ndarray:
            array, origin = as_array(state[prefix + name], prefix + name)
            if origin.dtype != "bfloat16":
                raise ValueError(f"{prefix + name}: expected bfloat16, got {origin.dtype}")
            return array

        rank = 0 if self.group is None else self.group.rank
        experts = range(rank * self.num_local_experts, (rank + 1) * self.num_local_experts)
        router = get("gate.weight")
        self.w_router = self._hold(router.T)
        self.w_up = self._hold(xp().stack([xp().concatenate([get(f"experts.{e}.gate_proj.weight"),
                                             get(f"experts.{e}.up_proj.weight")]) for e in experts]))
        self.w_down = self._hold(xp().stack([get(f"experts.{e}.down_proj.weight") for e in experts]))
        if self.shared is not None:
            base = "shared_experts." if prefix + "shared_experts.gate_proj.weight" in state else "shared_expert."
            up = xp().concatenate([get(base + "gate_proj.weight"), get(base + "up_proj.weight")])
            self.shared = (self._hold(up), self._hold(get(base + "down_proj.weight")))
