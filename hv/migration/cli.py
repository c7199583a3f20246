"""run-guest's live-migration options (hv.cli adds them and calls setup()).

    run-guest --mem 256 --balloon --control /tmp/src.sock      source; then QMP
        {"execute": "migrate", "arguments": {"uri": "tcp:HOST:PORT"}}
    run-guest --mem 256 --balloon --incoming tcp:0.0.0.0:4444  destination
    run-guest --mem 256 --balloon --incoming defer --control /tmp/dst.sock
        destination waiting for QMP's migrate-incoming {"uri": "tcp:0.0.0.0:4444"}
    run-guest --mem 256 --balloon --incoming file:/var/tmp/guest.snap
        restore a snapshot (QMP migrate {"uri": "file:PATH"} or
        __io.github.hv_snapshot-save wrote it)

Every machine gets the migration commands. With --incoming the machine is
not booted: it waits for a migration, restores the guest it receives and
runs it. A malformed stream or a dropped connection ends run-guest with a
one-line error and a non-zero status; nothing runs. Except in postcopy after
the switch: the guest is here then, and a failure leaves it paused
(postcopy-paused) until quit.
"""

from __future__ import annotations

import argparse
import math
import sys

from .commands import install
from .incoming import IncomingMigration
from .postcopy import PostcopyFailed
from .protocol import MigrationError


def _uri(text: str) -> str:
    """argparse type of --incoming: tcp:HOST:PORT (checked as the receiver
    reads it), file:PATH or defer."""
    from .transport import parse_uri
    if text == "defer":
        return text
    if text.startswith("file:"):
        if len(text) == 5:
            raise argparse.ArgumentTypeError("file: needs a path: file:/path/to/snapshot")
        return text
    try:
        parse_uri(text)
    except MigrationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _seconds(text: str) -> float:
    """argparse type of a timeout: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _tls_dir(text: str):
    """argparse type of --tls-dir: a credentials directory with the server's files."""
    from ..tls import TlsCredentials, TlsError
    try:
        return TlsCredentials(text, endpoint="server", id="tls0")
    except TlsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser) -> None:
    g = parser.add_argument_group("live migration")
    g.add_argument("--incoming", metavar="tcp:HOST:PORT|file:PATH|defer", type=_uri,
                   help="do not boot: wait for a live migration on HOST:PORT and run the "
                        "guest it brings (start with the same --mem and devices as the "
                        "source); PORT 0 picks a free port, printed on stderr as "
                        "'hv: incoming migration listening on tcp:HOST:PORT'; defer: wait "
                        "for QMP's migrate-incoming to say where; file:PATH: restore the "
                        "snapshot at PATH")
    g.add_argument("--incoming-snapshot", choices=["map", "copy"], default="map",
                   help="how a file: snapshot is restored: map it copy-on-write (default; "
                        "restore time does not grow with guest size, the file must not "
                        "change while the guest runs) or copy it into guest memory")
    g.add_argument("--incoming-timeout", metavar="SEC", type=_seconds, default=None,
                   help="give up when no migration arrives within SEC seconds")
    g.add_argument("--incoming-io-timeout", metavar="SEC", type=_seconds, default=60.0,
                   help="give up when the source sends nothing for SEC seconds (default 60)")
    g.add_argument("--incoming-require-verify", action="store_true",
                   help="refuse a migration that does not carry page hashes (VERIFY); "
                        "for a file: snapshot, check every stored page against its hash")
    g.add_argument("--incoming-prefault", choices=["on", "off"], default="on",
                   help="fault in all of guest RAM while waiting for the source, so pages "
                        "arrive into mapped memory (default on); off keeps the destination's "
                        "memory use to what the source sends")
    g.add_argument("--tls-dir", metavar="DIR", type=_tls_dir, default=None,
                   help="TLS credentials (ca-cert.pem, server-cert.pem, server-key.pem; "
                        "python -m hv.tls make-creds DIR writes them) as object tls0, like "
                        "QEMU's -object tls-creds-x509,id=tls0,dir=DIR,endpoint=server; an "
                        "--incoming destination then accepts only TLS sources whose client "
                        "certificate its CA signed")


def setup(args, machine) -> bool:
    if getattr(machine, "migration_commands", None) is None:
        install(machine)
    creds = getattr(args, "tls_dir", None)
    if creds is not None:
        from ..tls import objects
        objects(machine)[creds.id] = creds
    uri = getattr(args, "incoming", None)
    if not uri:
        return False
    inc = IncomingMigration.of(machine)
    inc.configure(timeout=args.incoming_io_timeout, accept_timeout=args.incoming_timeout,
                  require_verify=args.incoming_require_verify,
                  prefault=args.incoming_prefault == "on", tls=creds)
    inc.snapshot_mode = args.incoming_snapshot
    if uri == "defer":
        if not getattr(args, "control", None):
            raise MigrationError("--incoming defer needs --control: migrate-incoming "
                                 "arrives there")
        inc.defer()
    else:
        try:
            inc.run(uri)
        except PostcopyFailed as e:
            # the guest runs here since the switch: keep it, paused, until quit
            print(f"hv: {e}", file=sys.stderr, flush=True)
    return True
