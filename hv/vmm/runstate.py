"""The machine's run states (QEMU's names), who may hold a pause, and the
error the VMM core raises.

    prelaunch --start()--> running --pause(owner)--> paused --resume(owner)--> running
    inmigrate --(incoming migration restored)--> running
    paused --a migration completed--> postmigrate   (the guest runs elsewhere;
                                                      only quit is left)
        any --guest powers off / reboots / fails, stop()--> shutdown

A pause has owners: "user" (the stop command), "migration" (its final
phase) and "postcopy" (a postcopy destination that lost its source). The guest runs again only when every owner has resumed it, so a
client's cont cannot undo a migration's pause (it is refused), and a user's
stop during a migration survives the migration's resume.
"""

from __future__ import annotations

from ..errors import HvError

STATUS_PRELAUNCH = "prelaunch"
STATUS_RUNNING = "running"
STATUS_PAUSED = "paused"
STATUS_SHUTDOWN = "shutdown"
STATUS_INMIGRATE = "inmigrate"
STATUS_POSTMIGRATE = "postmigrate"

#: who holds a pause
PAUSE_USER = "user"
PAUSE_MIGRATION = "migration"
#: a postcopy destination whose migration failed after the switch: pages are
#: missing, so the guest must not run (QEMU's postcopy-paused)
PAUSE_POSTCOPY = "postcopy"


class MachineError(HvError):
    """What the VMM core refuses or fails to do, said so that a user can act."""


POSTMIGRATE_MESSAGE = ("the guest has migrated and runs on the destination; this source "
                       "keeps it paused for good: only quit is left (status postmigrate)")
MIGRATION_HOLDS_MESSAGE = ("a migration holds the guest paused while it sends the final "
                           "state; wait for it to finish, or cancel it with migrate-cancel")
POSTCOPY_HOLDS_MESSAGE = ("the postcopy migration failed after the guest moved here and "
                          "some of its pages never arrived: the guest stays paused "
                          "(postcopy-paused); it cannot run without them")
