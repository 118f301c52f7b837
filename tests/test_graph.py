"""Unit tests of deps-map validation, ordering and injection (pure logic)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_celery.canvas import merge_results
from fusion_celery.errors import DepsMapError
from fusion_celery.graph import Dep, DepsGraph, inject, register_arg_in_fn

SEED = {"one": {"topic": "add", "args": [1, 2, 3]},
        "two": {"topic": "subtract", "args": [2], "arg_in_fn": "cons", "deps": ["one"]}}


def test_seed_example_injection():
    g = DepsGraph(SEED)
    assert g.levels == [["one"], ["two"]]
    assert inject(g.deps["one"], {}) == [1, 2, 3]
    assert inject(g.deps["two"], {"one": 6}) == [6, 2]


def test_injection_follows_deps_order_not_set_order():
    g = DepsGraph({"a": {"topic": "x"}, "b": {"topic": "x"}, "c": {"topic": "x", "args": [0], "deps": ["b", "a"]}})
    assert inject(g.deps["c"], {"a": "A", "b": "B"}) == [0, "B", "A"]


def test_custom_arg_in_fn_and_fusion_clj_spelling():
    register_arg_in_fn("times", lambda args, result: [a * result for a in args])
    g = DepsGraph({"a": {"topic": "x"}, "b": {"topic": "y", "args": [1, 2], "arg-in-fn": "times", "deps": ["a"]}})
    assert inject(g.deps["b"], {"a": 3}) == [3, 6]


def test_components_and_levels():
    g = DepsGraph({"a": {"topic": "t"}, "b": {"topic": "t", "deps": ["a"]}, "c": {"topic": "t", "deps": ["a"]},
                   "d": {"topic": "t", "deps": ["b", "c"]}, "x": {"topic": "t"}})
    assert g.components() == [[["a"], ["b", "c"], ["d"]], [["x"]]]


def test_isolated_dep_is_kept():
    g = DepsGraph({"lonely": {"topic": "t"}, "a": {"topic": "t"}})
    assert sorted(g.order) == ["a", "lonely"]


@pytest.mark.parametrize("deps_map,match", [
    ({"a": {"topic": "t", "deps": ["nope"]}}, r"deps-map\['a'\]\.deps\[0\]: unknown dep 'nope'"),
    ({"a": {"topic": "t", "deps": ["b"]}, "b": {"topic": "t", "deps": ["a"]}}, r"cycle: (a -> b -> a|b -> a -> b)"),
    ({"a": {"topic": "t", "deps": ["a"]}}, r"cycle: a -> a"),
    ({"a": {"args": [1]}}, r"deps-map\['a'\]: missing 'topic'"),
    ({"a": {"topic": "bad topic!"}}, r"not a legal Kafka topic"),
    ({"a": {"topic": "t"}, "b": {"topic": "t", "deps": ["a"], "arg_in_fn": "zap"}}, r"unknown function 'zap'"),
    ({"a": {"topic": "t"}, "b": {"topic": "t", "deps": ["a"], "arg_in_fn": len}}, r"registered function"),
    ({"a": {"topic": "t"}, "b": {"topic": "t", "deps": ["a"], "args": 5}}, r"\.args: must be a list"),
    ({"a": {"topic": "t", "args": {1, 2}}}, r"not JSON-serializable"),
    ({"a": {"topic": "t", "timeout": -1}}, r"timeout: must be a positive"),
    ({"a": {"topic": "t", "key": 42}}, r"deps-map\['a'\]\.key: must be a string .*got int"),
    ({"a": {"topic": "t", "key": ["acct", 1]}}, r"\.key: must be a string .*got list"),
    ({"a": {"topic": "t", "dpes": []}}, r"unknown key"),
    ({"a": "add"}, r"must be a mapping"),
    ([1, 2], r"must be a mapping"),
])
def test_invalid_deps_maps_name_the_culprit(deps_map, match):
    with pytest.raises(DepsMapError, match=match):
        DepsGraph(deps_map)


def test_a_key_is_kept_and_travels_with_the_dep_only_when_given():
    g = DepsGraph({"keyed": {"topic": "t", "key": "account-42"}, "plain": {"topic": "t", "key": None},
                   "empty": {"topic": "t", "key": ""}})
    assert (g.deps["keyed"].key, g.deps["plain"].key, g.deps["empty"].key) == ("account-42", None, "")
    assert g.deps["keyed"].to_dict()["key"] == "account-42"
    assert "key" not in g.deps["plain"].to_dict(), "a dep without a key sends the same Celery message as before"
    for dep in g.deps.values():
        assert Dep.from_dict(dep.to_dict()) == dep


def test_timeout_longer_than_chord_lifetime_is_refused():
    with pytest.raises(DepsMapError, match="result_chord_expires"):
        DepsGraph({"a": {"topic": "t", "timeout": 100}}, max_timeout=10)


def test_merge_results_flattens_chord_results():
    assert merge_results([{"a": 1}, [{"b": 2}, {"c": 3}], None]) == {"a": 1, "b": 2, "c": 3}


def test_renderings():
    g = DepsGraph(SEED)
    assert "d_one --> d_two" in g.to_mermaid()
    assert '"one" -> "two";' in g.to_dot()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=0, max_size=3),
                       st.dictionaries(st.sampled_from(["topic", "args", "deps", "arg_in_fn", "timeout", "key", "zz"]),
                                       st.none() | st.integers() | st.text(max_size=4)
                                       | st.lists(st.text(max_size=3), max_size=3)), max_size=5)
       | st.integers() | st.text())
def test_any_structure_is_valid_or_a_clear_error(deps_map):
    try:
        g = DepsGraph(deps_map)
    except DepsMapError as exc:
        assert str(exc)
    else:
        assert set(g.order) == set(deps_map)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                        | st.dictionaries(scalars.filter(lambda x: x == x), inner, max_size=3)
                        | st.sets(st.integers(), max_size=2), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=3) | st.integers(),
                       st.dictionaries(st.sampled_from(["topic", "args", "deps", "arg_in_fn", "arg-in-fn", "timeout",
                                                        "key", "result"]) | st.integers() | st.text(max_size=3),
                                       anything, max_size=5) | anything, max_size=5) | anything)
def test_any_python_structure_is_a_graph_or_a_deps_map_error(deps_map):
    try:
        g = DepsGraph(deps_map)
    except DepsMapError as exc:
        assert str(exc)
    else:
        assert set(g.order) == set(deps_map)


def test_deeply_nested_args_are_a_deps_map_error():
    args = []
    for _ in range(100_000):
        args = [args]
    with pytest.raises(DepsMapError, match="args"):
        DepsGraph({"a": {"topic": "t", "args": args}})


@pytest.mark.parametrize("timeout", [10**400, float("nan"), float("inf"), 0, True])
def test_absurd_timeouts_are_a_deps_map_error(timeout):
    with pytest.raises(DepsMapError, match="timeout"):
        DepsGraph({"a": {"topic": "t", "timeout": timeout}})
