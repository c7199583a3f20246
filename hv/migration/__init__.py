"""Live migration: wire protocol, sender, receiver.

    hv.migration.protocol   the wire format and its documentation
    hv.migration.pages      numpy wrappers over hv._pages (the per-page loops)
    hv.migration.sender     Migration: the source side, in a thread
    hv.migration.receiver   incoming(machine, uri): the destination side
    hv.migration.postcopy   the switch, the destination's userfaultfd page
                            server and the source's push after it
    hv.migration.commands   install(machine): migrate, query-migrate, migrate-cancel
"""


def install(machine):
    """Register migrate / query-migrate / migrate-cancel in machine.commands."""
    from .commands import install as _install
    return _install(machine)
