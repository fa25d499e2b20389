"""Run one of DeepEP's own tests against xmoe: ``import xmoe as deep_ep``, with only the launcher
changed (issue 15): torchrun instead of torch.multiprocessing.spawn, gloo for the test's own
collectives (its all_gather_into_tensor through all_gather), every rank on cuda:0 (PEs
sharing one GPU). Fetch DeepEP's tests from before its EPv2 rewrite, e.g.

    git -C DeepEP show b306af0^:tests/test_intranode.py > test_intranode.py   # also test_low_latency.py, utils.py

then, with those three files beside this one:

    torchrun --standalone --nproc_per_node=2 tests/deepep/run.py tests/deepep/test_intranode.py --num-processes 2

``XMOE_DEBUG_SYNC=1`` synchronises the device after every normal-mode call (to tell host
ordering from device bugs). Not collected by pytest (DeepEP's files are not in the repository).
"""

from __future__ import annotations

import os
import runpy
import sys

import torch
import torch.distributed as dist

import xmoe

sys.modules["deep_ep"] = xmoe
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402  (DeepEP's tests/utils.py, beside this file)


def init_dist(local_rank: int, num_local_ranks: int):
    """DeepEP's ``init_dist`` for torchrun: gloo, and every rank on cuda:0."""
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    torch.cuda.set_device(0)
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(dist.get_world_size())))


def all_gather_into_tensor(output, input, group=None, async_op=False):
    """gloo's ``all_gather_into_tensor`` wants another output shape: gather into a list instead."""
    parts = [torch.empty_like(input) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, input, group=group)
    output.copy_(torch.stack(parts).view_as(output))


def synchronised(call):
    """``call`` followed by a device synchronisation."""
    def run(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        torch.cuda.synchronize()
        return result
    return run


utils.init_dist = init_dist
dist.all_gather_into_tensor = all_gather_into_tensor
if os.environ.get("XMOE_DEBUG_SYNC"):
    xmoe.Buffer.dispatch = synchronised(xmoe.Buffer.dispatch)
    xmoe.Buffer.combine = synchronised(xmoe.Buffer.combine)
# the test's spawn of one process a GPU: here torchrun started the ranks already
torch.multiprocessing.spawn = lambda fn, args, nprocs: fn(int(os.environ["LOCAL_RANK"]), *args)
test = sys.argv[1]
sys.argv = [test] + sys.argv[2:]
runpy.run_path(test, run_name="__main__")
