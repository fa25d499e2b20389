"""Kernel tunables: blocks, threads and the timeout of a cross-rank wait (DeepEP's ``Config``)."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, replace
from functools import lru_cache

#: Defaults per backend. The simulator runs every thread as a Python thread, so it
#: gets small launches; the GPU defaults are tuned in the GPU backend.
_DEFAULTS = {
    "sim": {"num_sms": 2, "num_threads": 32},
    "cuda": {"num_sms": 264, "num_threads": 512},
}
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Config:
    """Launch configuration of the dispatch/combine kernels.

    DeepEP's positional form ``Config(num_sms, nvl_chunk_size, nvl_buffer_size,
    rdma_chunk_size, rdma_buffer_size)`` is accepted; xmoe's own fields are keywords.

    Attributes:
        num_sms: blocks of the bulk kernels (None: the backend's default, or
            ``Buffer.set_num_sms``'s). DeepEP runs two channels an SM; xmoe's blocks take tokens
            and rows as they come, so this is the grid size (cut to what may spin at once where
            PEs share a GPU).
        nvl_chunk_size, nvl_buffer_size, rdma_chunk_size, rdma_buffer_size: DeepEP's ring-buffer
            sizes, in tokens. Accepted and kept for DeepEP scripts; xmoe's kernels do not read
            them: a peer's rows land whole in their own region of the symmetric buffer (sized by
            ``num_nvl_bytes``), with no ring buffer to chunk, and there is no RDMA path yet.
        num_threads: threads per block (None: the backend's default), at most 1024.
        timeout_s: how long a rank waits for a peer before raising ``RuntimeError``
            (None: ``XMOE_TIMEOUT_S`` from the environment, else 60 s).
        force_put: write into peers with NVSHMEM puts even where stores reach them
            (None: ``XMOE_FORCE_PUT=1`` in the environment); the cuda backend only.
        num_chunks: read by :func:`xmoe.moe` only: its tokens are split into this many chunks,
            so that the dispatch of chunk i + 1 and the combine of chunk i - 1 (on the Buffer's
            communication stream) overlap the experts of chunk i (on the caller's stream). The
            same on every rank; 1: no split.
    """

    num_sms: int | None = None
    nvl_chunk_size: int = 0
    nvl_buffer_size: int = 0
    rdma_chunk_size: int = 0
    rdma_buffer_size: int = 0
    _: KW_ONLY
    num_threads: int | None = None
    timeout_s: float | None = None
    force_put: bool | None = None
    num_chunks: int = 1

    @property
    def timeout_ns(self) -> int:
        """``timeout_s`` in nanoseconds, as the kernels' waits take it (a resolved config)."""
        return int(self.timeout_s * 1e9)

    def resolved(self, backend: str, num_sms: int | None = None) -> "Config":
        """This config with every None replaced by the default of ``backend`` (``num_sms``: the
        default grid instead of the backend's), checked."""
        return _resolve(self, backend, num_sms, os.environ.get("XMOE_TIMEOUT_S"), os.environ.get("XMOE_FORCE_PUT"))


def check_config(config: object) -> None:
    """``ValueError`` unless ``config`` is a :class:`Config` (the ``config`` argument of every call)."""
    if not isinstance(config, Config):
        raise ValueError(f"config: expected an xmoe.Config or None, got {type(config).__name__}")


@lru_cache(maxsize=64)
def _resolve(config: Config, backend: str, num_sms: int | None, env_timeout: str | None,
             env_force_put: str | None) -> Config:
    """``Config.resolved``, once per config, backend, default grid and environment (it is on every
    call's path)."""
    defaults = _DEFAULTS[backend]
    resolved = replace(
        config,
        num_sms=config.num_sms if config.num_sms is not None else num_sms or defaults["num_sms"],
        num_threads=config.num_threads if config.num_threads is not None else defaults["num_threads"],
        timeout_s=config.timeout_s if config.timeout_s is not None else float(env_timeout or DEFAULT_TIMEOUT_S),
        force_put=config.force_put if config.force_put is not None else env_force_put == "1",
    )
    if resolved.num_sms < 1:
        raise ValueError(f"config.num_sms={resolved.num_sms}: must be >= 1")
    if not 1 <= resolved.num_threads <= 1024:
        raise ValueError(f"config.num_threads={resolved.num_threads}: must be in [1, 1024]")
    if not resolved.timeout_s > 0:
        raise ValueError(f"config.timeout_s={resolved.timeout_s}: must be > 0")
    if not (isinstance(resolved.num_chunks, int) and resolved.num_chunks >= 1):
        raise ValueError(f"config.num_chunks={resolved.num_chunks!r}: must be an int >= 1")
    if resolved.force_put and backend != "cuda":
        raise ValueError("config.force_put=True: NVSHMEM puts need the cuda backend")
    return resolved
