"""Every test process runs xmoe's kernels on the backend chosen once, before Numba loads."""

import xmoe.runtime

xmoe.runtime.select_backend(None)
