"""The peer benchmark's interleaving: a peer that fails is recorded and dropped, the others
keep their samples (the peers themselves are not needed here)."""
import pytest

from bench.bench_peers import _interleaved


def test_a_failing_contender_is_recorded_and_the_others_keep_their_rounds():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1
        return 1.0

    def b():
        calls["b"] += 1
        if calls["b"] == 2:
            raise RuntimeError("linalg.cholesky: not positive-definite\nsecond line")
        return 2.0

    failures: dict[str, str] = {}
    times = _interleaved({"a": a, "b": b}, 3, failures)
    assert times == {"a": [1.0, 1.0, 1.0]}
    assert failures == {"b": "RuntimeError: linalg.cholesky: not positive-definite"}
    assert calls == {"a": 3, "b": 2}


def test_without_a_failure_record_an_error_propagates():
    def boom():
        raise ValueError("x")

    with pytest.raises(ValueError):
        _interleaved({"boom": boom}, 1)
