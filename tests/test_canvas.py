"""Compiling a deps-map into Celery's canvas (no services)."""

from __future__ import annotations

from fusion_celery import create_app
from fusion_celery.canvas import chord_lifetime, compile_deps, dispatch_id
from fusion_celery.graph import DepsGraph
from fusion_celery.run import Caller, Run

APP = create_app("canvas-unit")
RUN = Run(id="run-1", topic="math", caller=Caller(return_topic="fusion.rt.1", id="m1"))
BODY = APP.signature("fusion.reactor.math.process", kwargs={"message": {}})


def _names(sig):
    """The dep names of a canvas, nested as its chains (lists), groups (sets) and chords ({header, body})."""
    kind = sig["task"]
    if kind == "celery.chain":
        return [_names(s) for s in sig.tasks]
    if kind == "celery.group":
        return frozenset(_names(s) for s in sig.tasks)
    if kind == "celery.chord":
        return {"header": sorted((_names(s) for s in sig.tasks), key=str), "body": _names(sig.body)}
    if kind == "fusion.dispatch":
        return sig["kwargs"]["dep"]["name"]
    return kind


def test_one_component_is_a_chain_of_its_levels_ending_in_the_body():
    graph = DepsGraph({"a": {"topic": "t", "args": [1]},
                       "b": {"topic": "t", "args": [], "deps": ["a"]},
                       "c": {"topic": "t", "args": [], "deps": ["a"]},
                       "d": {"topic": "t", "args": [], "deps": ["b", "c"]}})
    canvas = compile_deps(APP, graph, BODY, run=RUN, deadline=123)
    # Celery makes a group followed by more steps a chord: b and c side by side, then d, then the body.
    assert _names(canvas) == ["a", {"header": ["b", "c"], "body": ["d", "fusion.reactor.math.process"]}]


def test_disjoint_components_run_side_by_side_as_a_group_before_the_body():
    graph = DepsGraph({"a": {"topic": "t", "args": [1]},
                       "b": {"topic": "t", "args": [], "deps": ["a"]},
                       "x": {"topic": "u", "args": [2]}})
    canvas = compile_deps(APP, graph, BODY, run=RUN)
    assert _names(canvas) == {"header": [["a", "b"], "x"], "body": "fusion.reactor.math.process"}


def test_each_dispatch_carries_its_dep_the_run_and_the_deadline_under_a_derived_id():
    graph = DepsGraph({"a": {"topic": "t", "args": [1], "timeout": 5}})
    canvas = compile_deps(APP, graph, BODY, run=RUN, deadline=123)
    first = canvas.tasks[0]
    assert first["kwargs"]["run"] == RUN.to_dict() and first["kwargs"]["deadline"] == 123
    assert first["kwargs"]["dep"]["topic"] == "t" and first["kwargs"]["dep"]["timeout"] == 5
    assert first.options["task_id"] == dispatch_id("run-1", "a")
    assert first.options["shadow"] == "fusion.dispatch[t]"
    again = compile_deps(APP, graph, BODY, run=RUN, deadline=123)
    assert again.tasks[0].options["task_id"] == first.options["task_id"], "a second compilation asks nobody again"
    assert dispatch_id("run-1", "a") != dispatch_id("run-2", "a") != dispatch_id("run-1", "b")


def test_the_chord_lifetime_follows_result_chord_expires_then_result_expires():
    app = create_app("canvas-lifetime")
    app.conf.result_chord_expires = None
    app.conf.result_expires = 600
    assert chord_lifetime(app) == 600.0
    app.conf.result_chord_expires = 60
    assert chord_lifetime(app) == 60.0
    app.conf.result_expires = app.conf.result_chord_expires = None
    assert chord_lifetime(app) is None
