"""Dirty-limit (QEMU's `dirty-limit` capability and `vcpu-dirty-limit`
parameter, MB/s): with dirty rings each vCPU's dirty rate is known from its
own ring, so only the vCPUs that dirty fast are throttled, each just enough
to keep its rate at the limit, while the others run at full speed (where
auto-converge slows every vCPU alike).

Every PERIOD_S the controller reads how many entries each vCPU's ring
published (RingDirtyLog.vcpu_dirtied) over the last WINDOW_S and divides by
the share of that time the vCPU was let run: its dirty rate while running.
The share that keeps it at the limit follows at once (limit / that rate),
so there is no slow feedback loop to swing; the window is longer than a
throttled vCPU's run-and-sleep cycle, whose dirtying comes in bursts. The
throttle itself is the machine's (timeslices of CPU_THROTTLE_TIMESLICE_S,
hv.vmm.Machine.set_vcpu_throttle)."""

from __future__ import annotations

import collections
import math
import threading
import time

from ..memory import PAGE_SIZE
from ..vmm.machine import CPU_THROTTLE_TIMESLICE_S, MAX_CPU_THROTTLE

#: how often the throttles are set, and the window their rates are measured
#: over (QEMU measures once a second, x-vcpu-dirty-limit-period)
PERIOD_S = 0.1
WINDOW_S = 1.0
MAX_WINDOW_S = 5.0
MB = 1_000_000


def throttle_for(running_mb_s: float, limit_mb_s: float) -> int:
    """The throttle percentage that keeps a vCPU dirtying running_mb_s while
    it runs at limit_mb_s."""
    if running_mb_s <= limit_mb_s:
        return 0
    return max(0, min(MAX_CPU_THROTTLE, math.ceil(100 - 100 * limit_mb_s / running_mb_s)))


class DirtyLimit:
    """Keeps each vCPU of machine at or below limit_mb_s of dirtied memory,
    from the rates in log (a started RingDirtyLog), until stop()."""

    def __init__(self, machine, log, limit_mb_s: float):
        self.machine = machine
        self.log = log
        self.limit = float(limit_mb_s)
        n = len(machine.vcpus)
        self.percent = [0] * n
        self.highest = [0] * n          # each vCPU's highest throttle so far
        self.rates = [0.0] * n
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "DirtyLimit":
        self._thread = threading.Thread(target=self._loop, name="hv-dirty-limit", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        n = len(self.percent)
        # (time, entries published, the shares of run time until the next sample)
        history = collections.deque([(time.monotonic(), list(self.log.vcpu_dirtied),
                                      [1.0] * n)])
        while not self._stop.wait(PERIOD_S):
            t, now = time.monotonic(), list(self.log.vcpu_dirtied)
            # long enough that the most throttled vCPU ran two timeslices in
            # it (a vCPU at 99 % runs one a second), at most MAX_WINDOW_S
            least = min((100 - p) / 100 for p in self.percent)
            window = min(max(WINDOW_S, 2.5 * CPU_THROTTLE_TIMESLICE_S / least), MAX_WINDOW_S)
            while len(history) > 1 and t - history[1][0] >= window:
                history.popleft()
            t0, then, _ = history[0]
            dt = max(t - t0, 1e-6)
            ends = [h[0] for h in list(history)[1:]] + [t]
            for i in range(n):
                # the share of the window this vCPU was let run
                share = sum((end - h[0]) * h[2][i] for h, end in zip(history, ends)) / dt
                wall = (now[i] - then[i]) * PAGE_SIZE / MB / dt
                running = wall / max(share, 0.01)
                # too little run time in the window to say (a vCPU throttled
                # near the maximum runs one timeslice a second): keep it
                known = dt >= WINDOW_S / 2 and share * dt >= 2 * CPU_THROTTLE_TIMESLICE_S
                pct = throttle_for(running, self.limit) if known else self.percent[i]
                with self._lock:
                    self.rates[i] = wall
                if pct != self.percent[i]:
                    self.percent[i] = pct
                    self.highest[i] = max(self.highest[i], pct)
                    self.machine.set_vcpu_throttle(i, pct)
            history.append((t, now, [(100 - p) / 100 for p in self.percent]))

    def stop(self) -> None:
        """End the throttling: every vCPU at full speed again."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        for i, pct in enumerate(self.percent):
            if pct:
                self.machine.set_vcpu_throttle(i, 0)
                self.percent[i] = 0

    def info(self) -> dict:
        with self._lock:
            return {"vcpu-dirty-limit": self.limit,
                    "vcpus": [{"cpu": i, "dirty-rate-mb-s": round(r, 1),
                               "throttle-percentage": p, "highest-throttle-percentage": h}
                              for i, (r, p, h) in enumerate(zip(self.rates, self.percent,
                                                                self.highest))]}
