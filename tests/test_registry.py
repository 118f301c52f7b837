"""Choosing the registry backend: by the scheme of fusion_registry_url, through the entry-point group
``fusion_celery.registries`` (no services needed)."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from fusion_celery import registry as registry_module
from fusion_celery.application import create_app
from fusion_celery.backends.memory import MemoryRegistry
from fusion_celery.config import reload
from fusion_celery.errors import ConfigurationError
from fusion_celery.registry import ENTRY_POINT_GROUP, Registry, Wait, Watcher, registry_for


class FakeRegistry(Registry):
    """A third party's backend: it only remembers how it was made."""

    def __init__(self, app, url):
        self.app, self.url = app, url

    def register(self, wait: Wait) -> None:
        raise NotImplementedError

    def remove(self, wait: Wait) -> None:
        raise NotImplementedError

    def watch(self, name: str) -> Watcher:
        raise NotImplementedError

    def pending(self) -> list[Wait]:
        return []


@pytest.fixture
def app():
    app = create_app("registry-test", broker="memory://", backend="cache+memory://")
    yield app
    app.close()


def use(app, url: str) -> None:
    app.conf.fusion_registry_url = url
    reload(app)


@pytest.fixture
def installed(monkeypatch):
    """Replace the installed entry points of the group with the ones a test gives."""
    def install(*eps: EntryPoint) -> None:
        def entry_points(group: str):
            assert group == ENTRY_POINT_GROUP
            return list(eps)
        monkeypatch.setattr(registry_module, "entry_points", entry_points)
    return install


def test_the_package_declares_its_backends_as_entry_points():
    from importlib.metadata import entry_points
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert found == {"kafka": "fusion_celery.backends.kafka:KafkaRegistry",
                     "zookeeper": "fusion_celery.backends.zookeeper:ZooKeeperRegistry",
                     "memory": "fusion_celery.backends.memory:MemoryRegistry.shared"}, \
        "reinstall the package (pip install -e .) after changing its entry points"


def test_a_backend_registered_under_a_new_scheme_is_found(app, installed):
    installed(EntryPoint("fake", f"{__name__}:FakeRegistry", ENTRY_POINT_GROUP))
    use(app, "fake://somewhere/waits")
    reg = registry_for(app)
    assert isinstance(reg, FakeRegistry)
    assert (reg.app, reg.url) == (app, "fake://somewhere/waits")


def test_an_entry_point_replaces_a_built_in_backend_of_the_same_scheme(app, installed):
    installed(EntryPoint("memory", f"{__name__}:FakeRegistry", ENTRY_POINT_GROUP))
    use(app, "memory://x")
    assert isinstance(registry_for(app), FakeRegistry)


def test_the_built_in_backends_are_found_without_installed_metadata(app, installed):
    installed()
    use(app, "memory://registry-test")
    reg = registry_for(app)
    assert isinstance(reg, MemoryRegistry)
    assert registry_for(app) is reg, "memory:// is one registry per URL in a process"


def test_an_unknown_scheme_names_itself_and_the_known_ones(app, installed):
    installed(EntryPoint("fake", f"{__name__}:FakeRegistry", ENTRY_POINT_GROUP))
    use(app, "redis://user:s3cret@cache:6379/0")
    with pytest.raises(ConfigurationError) as err:
        registry_for(app)
    message = str(err.value)
    assert "'redis'" in message
    for scheme in ("fake://", "kafka://", "memory://", "zookeeper://"):
        assert scheme in message, message
    assert ENTRY_POINT_GROUP in message
    assert "s3cret" not in message, "the URL's password is never shown"


def test_a_backend_that_cannot_be_loaded_is_a_configuration_error(app, installed):
    installed(EntryPoint("broken", "fusion_celery.no_such_module:Registry", ENTRY_POINT_GROUP))
    use(app, "broken://x")
    with pytest.raises(ConfigurationError, match="cannot load the registry backend .*'broken'"):
        registry_for(app)


def test_a_worker_whose_registry_url_nobody_serves_stops_at_once_saying_why(caplog):
    """The waiter opens the registry in its own thread; its error reaches the worker, which logs it and
    stops, instead of waiting for the waiter to be ready and reporting only that it was not."""
    import logging

    from fusion_celery.testing import in_process_app, worker
    app = in_process_app("bad-registry", fusion_registry_url="nope://somewhere/waits")
    with caplog.at_level(logging.CRITICAL, logger="fusion_celery"):
        with pytest.raises(RuntimeError, match="stopped while starting"):
            with worker(app, ready_timeout=60):
                pass
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("fusion-celery cannot start" in m and "'nope'" in m for m in critical), critical
    assert not any("did not start within" in m for m in critical), critical
