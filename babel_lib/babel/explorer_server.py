"""The kernel manager of `make explore`'s Voilà server: idle kernels are culled, but never the one a page is
about to connect to.

Voilà protects its preheated kernels from the culler only while they wait in the pool. A kernel handed to a page
has been idle since it was preheated (often longer than the cull timeout), and the page connects a second or two
later: a culler pass in between shuts it down and the page shows no explorer ("Kernel does not exist")."""

from __future__ import annotations

from datetime import datetime, timezone

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Set


class ExplorerKernelManager(AsyncMappingKernelManager):
    """Counts a kernel's idle time from the first culler pass that can take it (for a preheated kernel: the first
    pass after Voilà handed it out), not from its last activity before that."""

    _seen = Set()

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        """Cull as usual a kernel seen before; restart the idle clock of one seen for the first time."""
        self._seen &= set(self._kernels)
        if kernel_id not in self._seen:
            self._seen.add(kernel_id)
            self._kernels[kernel_id].last_activity = datetime.now(timezone.utc)
            return
        await super().cull_kernel_if_idle(kernel_id)
