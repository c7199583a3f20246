"""Migrate one machine into another inside the test process, over loopback TCP."""

import threading

from hv.migration.receiver import Prefault, receive
from hv.migration.transport import listen
from hv.migration.sender import Migration, MigrationParams
from hv.vmm import PAUSE_POSTCOPY


def migrate_over_loopback(src, dst, restore=None, timeout: float = 30, prefault=False,
                          **params):
    """Receive into dst on a thread while src migrates with params (with
    prefault, dst's RAM is faulted in while it waits, as run-guest --incoming
    does; in postcopy, a failure after the switch pauses dst). Returns (src's
    query-migrate statistics, {"rx": ...} or {"error": ...})."""
    lst = listen("tcp:127.0.0.1:0")
    port = lst.getsockname()[1]
    res = {}
    faulting = Prefault(dst.memory).start() if prefault else None
    if faulting is not None:
        faulting.thread.join()      # all of it resident before the source starts

    def run():
        try:
            res["rx"] = receive(dst.memory, lst, restore or dst.restore_state, dst.start,
                                timeout=timeout, prefault=faulting,
                                pause=lambda: dst.pause(PAUSE_POSTCOPY, timeout=1.0,
                                                         keep=True))
        except Exception as e:
            res["error"] = e
        finally:
            lst.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    mig = Migration(src, MigrationParams(uri=f"tcp:127.0.0.1:{port}", **params))
    mig.run()
    t.join(timeout)
    return mig.query(), res
