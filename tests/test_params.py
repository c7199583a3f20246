"""Control command arguments are checked for type and range before anything
starts, and a bad one gets an error that names it (no KVM needed)."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from hv.devices.virtio.balloon import Balloon
from hv.memory import GuestMemory
from hv.migration.protocol import MigrationError
from hv.migration.sender import MigrationParams
from hv.params import ParameterError

GOOD = {"uri": "tcp:127.0.0.1:4444"}

BAD_MIGRATE = [
    ({"uri": 123}, "uri"),
    ({"uri": "udp:1.2.3.4:5"}, "tcp:HOST:PORT"),
    ({"downtime_ms": "x"}, "downtime_ms"),
    ({"downtime_ms": float("nan")}, "downtime_ms"),
    ({"downtime_ms": float("inf")}, "downtime_ms"),
    ({"downtime_ms": 0}, "downtime_ms"),
    ({"downtime_ms": True}, "downtime_ms"),
    ({"max_bandwidth_mib": "x"}, "max_bandwidth_mib"),
    ({"max_bandwidth_mib": -5}, "max_bandwidth_mib"),
    ({"timeout_s": -1}, "timeout_s"),
    ({"verify": "no"}, "verify"),
    ({"verify": 1}, "verify"),
    ({"connections": 1.5}, "connections"),
    ({"connections": 65}, "connections"),
    ({"max_rounds": -1}, "max_rounds"),
    ({"free_pages": "maybe"}, "free_pages"),
    ({"dirty_log": "pml"}, "dirty_log"),
    ({"downtime_strategy": "pray"}, "downtime_strategy"),
    ({"frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize("extra,named", BAD_MIGRATE)
def test_bad_migrate_argument_is_named(extra, named):
    with pytest.raises(MigrationError, match=named):
        MigrationParams.from_args({**GOOD, **extra})


def test_missing_uri_is_named():
    with pytest.raises(MigrationError, match="Parameter 'uri' is missing"):
        MigrationParams.from_args({})


def test_good_migrate_arguments_keep_their_types():
    p = MigrationParams.from_args({**GOOD, "downtime_ms": 50, "verify": False,
                                   "connections": 4.0, "max_bandwidth_mib": 12.5})
    assert p.verify is False and p.connections == 4 and isinstance(p.connections, int)
    assert p.downtime_ms == 50 and p.max_bandwidth_mib == 12.5


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) |
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(MigrationParams.CHECKS) + ["bogus"]),
                       json_values, max_size=5))
def test_any_migrate_arguments_are_checked_or_refused(args):
    args = {**GOOD, **args} if "uri" not in args else args
    try:
        p = MigrationParams.from_args(dict(args))
    except MigrationError as e:
        assert str(e)
        return
    # What got through has the types and ranges the migration relies on.
    assert isinstance(p.uri, str) and p.uri.startswith("tcp:")
    assert isinstance(p.verify, bool) and isinstance(p.progress, bool)
    assert isinstance(p.connections, int) and 1 <= p.connections <= 64
    assert isinstance(p.max_rounds, int) and p.max_rounds >= 0
    for v in (p.downtime_ms, p.max_bandwidth_mib, p.timeout_s):
        assert not isinstance(v, bool) and math.isfinite(v)
    assert p.downtime_ms > 0 and p.max_bandwidth_mib >= 0 and p.timeout_s > 0
    assert p.free_pages in ("bitmap", "hint", "off")


@pytest.mark.parametrize("target", [1e308, -1, "0", True, float("nan"), None, [1]])
def test_bad_balloon_target_is_named(target):
    b = Balloon(GuestMemory(16 << 20))
    with pytest.raises(ParameterError, match="target_mib"):
        b.commands()["balloon"]({"target_mib": target})
    assert b.num_pages == 0


def test_balloon_commands_refuse_unknown_arguments():
    b = Balloon(GuestMemory(16 << 20))
    with pytest.raises(ParameterError, match="target"):
        b.commands()["balloon"]({"target": 4})
    with pytest.raises(ParameterError, match="timeout_ms"):
        b.commands()["request-free-page-bitmap"]({"timeout_ms": "soon"})
    b.commands()["balloon"]({"target_mib": 4})
    assert b.num_pages == 1024
