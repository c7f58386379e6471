"""Tests of icstools.schedules: every / at_steps / log_spaced / as_schedule."""

from __future__ import annotations

import math

import pytest

from icstools.schedules import as_schedule, at_steps, every, log_spaced

# --------------------------------------------------------------------------------------------
# every
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "start"), [(1, 0), (3, 0), (10, 0), (4, 5), (7, 2), (1, 9)])
def test_every_matches_naive_definition(n, start):
    s = every(n, start=start)
    expected = [t for t in range(200) if t >= start and (t - start) % n == 0]
    assert [t for t in range(200) if s(t)] == expected
    assert s(start)
    if start:
        assert not s(start - 1)
    assert repr(s) == f"every({n}, start={start})"


def test_every_doc_example():
    assert [s for s in range(25) if every(10)(s)] == [0, 10, 20]


@pytest.mark.parametrize("n", [0, -1, -10, True, False, 2.0, 1.5, "3", None, [2]])
def test_every_bad_n(n):
    with pytest.raises(ValueError, match="every") as err:
        every(n)
    assert repr(n) in str(err.value)


@pytest.mark.parametrize("start", [-1, True, 1.0, "0", None])
def test_every_bad_start(start):
    with pytest.raises(ValueError, match="start") as err:
        every(2, start=start)
    assert repr(start) in str(err.value)


# --------------------------------------------------------------------------------------------
# at_steps
# --------------------------------------------------------------------------------------------


def test_at_steps():
    s = at_steps([0, 5, 5, 17])
    assert [t for t in range(30) if s(t)] == [0, 5, 17]
    assert s.steps == frozenset({0, 5, 17})
    assert repr(s) == "at_steps([0, 5, 17])"
    assert [t for t in range(10) if at_steps(iter(range(0, 10, 3)))(t)] == [0, 3, 6, 9]
    assert not any(at_steps([])(t) for t in range(10))


@pytest.mark.parametrize("steps", [[-1], [0, 3, -5]])
def test_at_steps_negative(steps):
    with pytest.raises(ValueError, match="≥ 0"):
        at_steps(steps)


@pytest.mark.parametrize("steps", [5, None, ["a"], [None]])
def test_at_steps_wrong_types_raise(steps):
    with pytest.raises((TypeError, ValueError)):
        at_steps(steps)


@pytest.mark.parametrize("steps", ["10", [2.5], [1.0, 2.7]])
def test_at_steps_does_not_silently_reinterpret(steps):
    """A string is iterated per character and floats are truncated by int(): at_steps("10")
    would record steps {0, 1}, at_steps([2.5]) step 2. Such input should be an error."""
    with pytest.raises((TypeError, ValueError)):
        at_steps(steps)


# --------------------------------------------------------------------------------------------
# log_spaced
# --------------------------------------------------------------------------------------------


def naive_log_spaced(last: int, per_decade: int) -> set[int]:
    out = {0, last}
    i = 0
    while 10 ** (i / per_decade) <= last:
        out.add(round(10 ** (i / per_decade)))
        i += 1
    return {s for s in out if s <= last}


@pytest.mark.parametrize("last", [0, 1, 2, 9, 10, 11, 99, 100, 101, 999, 1000, 12345, 10**6])
@pytest.mark.parametrize("per_decade", [1, 2, 3, 5, 10, 20])
def test_log_spaced_matches_naive(last, per_decade):
    s = log_spaced(last, per_decade=per_decade)
    assert isinstance(s, at_steps)
    assert s.steps == naive_log_spaced(last, per_decade)
    assert 0 in s.steps and last in s.steps and max(s.steps) == last


def test_log_spaced_density():
    s = sorted(log_spaced(10**5, per_decade=10).steps)
    assert s[:8] == [0, 1, 2, 3, 4, 5, 6, 8]  # dense early, rounded steps merged
    for k in range(2, 5):  # 10 per decade once steps are far apart
        assert sum(10**k <= t < 10 ** (k + 1) for t in s) == 10
    assert sorted(log_spaced(100, per_decade=2).steps) == [0, 1, 3, 10, 32, 100]


@pytest.mark.parametrize(("last", "per_decade"), [(-1, 10), (100, 0), (100, -2)])
def test_log_spaced_bad_values(last, per_decade):
    with pytest.raises(ValueError, match="last ≥ 0 and per_decade ≥ 1"):
        log_spaced(last, per_decade=per_decade)


@pytest.mark.parametrize(("last", "per_decade"), [("100", 10), (None, 10), (100, "2")])
def test_log_spaced_wrong_types(last, per_decade):
    with pytest.raises(TypeError):
        log_spaced(last, per_decade=per_decade)


# --------------------------------------------------------------------------------------------
# as_schedule
# --------------------------------------------------------------------------------------------


def test_as_schedule_int_and_callable():
    s = as_schedule(50)
    assert isinstance(s, every) and s.n == 50
    assert s(0) and s(100) and not s(99)

    def f(step: int) -> bool:
        return step in (3, 7)

    assert as_schedule(f) is f
    sched = at_steps([1])
    assert as_schedule(sched) is sched


@pytest.mark.parametrize("spec", [True, False])
def test_as_schedule_bool(spec):
    with pytest.raises(TypeError, match="jacobian_every must be an int"):
        as_schedule(spec, name="jacobian_every")


@pytest.mark.parametrize("spec", [0, -5])
def test_as_schedule_bad_int(spec):
    with pytest.raises(ValueError, match=str(spec)):
        as_schedule(spec)


@pytest.mark.parametrize("spec", [2.0, math.nan, "10", None, [1, 2]])
def test_as_schedule_wrong_type(spec):
    with pytest.raises(TypeError, match="stats_every must be an int") as err:
        as_schedule(spec, name="stats_every")
    assert type(spec).__name__ in str(err.value)
