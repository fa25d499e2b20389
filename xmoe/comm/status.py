"""The status words that kernels leave for the host: where each word lies, the error codes,
and how the host turns a code into an error naming the peer.

A Buffer's status words are int32 host memory the kernels write (mapped pinned memory on
the GPU), so the host learns of errors and of a dispatch's counts with no copy and no
synchronisation. Kernels get each part as its own array (:class:`StatusWords`); they
only know the codes below. This module imports no kernel code: the host reads it too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmoe.layout.symmetric import CALL_CODES, DTYPE_CODES, MAX_LOCAL_EXPERTS, META_FIELDS

# An error is ``kind | (field << FIELD_SHIFT) | peer``, its detail word a number the
# message needs. The first error a kernel reports stays (later ones are dropped).
FIELD_SHIFT = 12  # peers below 4096
#: No signal from ``peer`` within the call's timeout.
ERR_TIMEOUT = 1 << 20
#: ``peer``'s call differs in meta field ``field`` (:data:`META_FIELDS`); detail: the peer's value.
ERR_MISMATCH = 2 << 20
#: More rows arrived than the worst-case-sized outputs hold; detail: the rows that arrived.
ERR_CAPACITY = 3 << 20
#: This rank's layout arguments disagree (field: :data:`LAYOUT_ERRORS`, peer: the rank); detail: a token.
ERR_LAYOUT = 4 << 20
#: ``topk_idx`` holds an expert id out of range; detail: its flat index ``t * k + j``.
ERR_EXPERT_ID = 5 << 20
KIND_MASK = 0xF << 20

#: The layout inconsistencies a dispatch kernel checks (the field of an ``ERR_LAYOUT``).
LAYOUT_IN_RANK, LAYOUT_DUPLICATE = 0, 1
LAYOUT_ERRORS = {
    LAYOUT_IN_RANK: "is_token_in_rank[{detail}, {peer}] disagrees with topk_idx[{detail}] (which experts of rank "
                    "{peer} it names)",
    LAYOUT_DUPLICATE: "topk_idx[{detail}] names one expert twice",
}

# Word positions: the error code and its detail of the dispatch and combine kernels, those of
# the layout kernel (its errors are this rank's arguments, not a peer's), the host's number of
# the last call whose counts have landed, the count matrix ``[ranks, ranks]`` (row = source),
# tokens per local expert.
ERROR, DETAIL, LAYOUT_ERROR, LAYOUT_DETAIL, READY, COUNTS = range(6)


class StatusWords:
    """The status words of a Buffer of ``num_ranks`` ranks, and the views kernels take.

    Attributes:
        host: every word as a NumPy array (reads see the kernels' stores as they land).
        errors: int32 ``[2]``, the dispatch and combine kernels' error code and its detail.
        layout_errors: int32 ``[2]``, the layout kernel's.
        ready: int32 ``[1]``, the number of the call whose counts were gathered last.
        rank_counts: int32 ``[ranks, ranks]``, tokens rank ``i`` sends to rank ``j``.
        expert_counts: int32 ``[MAX_LOCAL_EXPERTS]``, tokens received per local expert.
    """

    def __init__(self, num_ranks: int, words: Any) -> None:
        """``words``: an :class:`xmoe.device_memory.HostWords` of :meth:`length` words."""
        self.num_ranks = num_ranks
        self._words = words
        self.host = words.host
        part = words.part
        self.errors = part(ERROR, (2,))
        self.layout_errors = part(LAYOUT_ERROR, (2,))
        self.ready = part(READY, (1,))
        self.rank_counts = part(COUNTS, (num_ranks, num_ranks))
        self.expert_counts = part(COUNTS + num_ranks * num_ranks, (MAX_LOCAL_EXPERTS,))

    @staticmethod
    def length(num_ranks: int) -> int:
        return COUNTS + num_ranks * num_ranks + MAX_LOCAL_EXPERTS

    def error(self) -> tuple[int, int]:
        """The dispatch and combine kernels' error code (0: none) and its detail."""
        return int(self.host[ERROR]), int(self.host[DETAIL])

    def layout_error(self, clear: bool = False) -> tuple[int, int]:
        """The layout kernel's error code (0: none) and its detail; ``clear``: then forget it."""
        code, detail = int(self.host[LAYOUT_ERROR]), int(self.host[LAYOUT_DETAIL])
        if clear:
            self.host[LAYOUT_ERROR : LAYOUT_DETAIL + 1] = 0
        return code, detail

    def ready_call(self) -> int:
        """The host's number of the call whose counts were gathered last."""
        return int(self.host[READY])

    def counts(self, num_local_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the count matrix and of the received tokens per local expert."""
        ranks = self.num_ranks
        matrix = self.host[COUNTS : COUNTS + ranks * ranks].reshape(ranks, ranks).copy()
        first = COUNTS + ranks * ranks
        return matrix, self.host[first : first + num_local_experts].copy()

    def free(self) -> None:
        self._words.free()


def describe(code: int, detail: int, rank: int, call: str, shape: tuple[int, ...], timeout_s: float) -> str:
    """The message of error ``code`` (with ``detail``) that rank ``rank`` saw in ``call``, whose
    own meta values were ``shape`` (in :data:`META_FIELDS` order)."""
    kind, field, peer = code & KIND_MASK, (code & ~KIND_MASK) >> FIELD_SHIFT, code & ((1 << FIELD_SHIFT) - 1)
    if kind == ERR_TIMEOUT:
        return f"{call}: rank {peer} never arrived within {timeout_s} s (did every rank call {call}?)"
    if kind == ERR_MISMATCH:
        name = META_FIELDS[field]
        mine = _meta_value(field, shape[field]) if field < len(shape) else "another value"
        return (f"{call}: ranks disagree on the call: rank {peer} has {name} {_meta_value(field, detail)}, "
                f"rank {rank} has {name} {mine} (every rank must make the same call with the same hidden size, "
                f"dtype and top-k)")
    if kind == ERR_CAPACITY:
        return (f"dispatch: rank {rank} received {detail} rows, more than the num_worst_tokens its recv_x holds; "
                f"nothing was received")
    if kind == ERR_LAYOUT:
        return f"{call}: " + LAYOUT_ERRORS[field].format(detail=detail, peer=peer)
    if kind == ERR_EXPERT_ID:
        return f"topk_idx: entry {detail} (flat index t * k + j) is not -1 or a valid expert id"
    return f"{call}: unknown error code {code}"


def _meta_value(field: int, value: int) -> str:
    """Meta word ``field``'s ``value`` as a message shows it (dtype and call by name)."""
    codes = {"payload dtype": DTYPE_CODES, "call": CALL_CODES}.get(META_FIELDS[field], {})
    return next((name for name, code in codes.items() if code == value), str(value))
