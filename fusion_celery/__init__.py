"""fusion-celery: Kafka microservices that call each other and wait for the answer, on Celery.

Public API::

    from fusion_celery import app, reactor, Reactor, Pipeline, Message, register_arg_in_fn, install

``celery -A fusion_celery worker`` runs a worker with the reactors of the
modules listed in ``fusion_imports`` (``FUSION_IMPORTS``).
"""

from .application import app, create_app, install
from .errors import (
                     ConfigurationError,
                     DependencyFailed,
                     DependencyTimeout,
                     DepsMapError,
                     FusionError,
                     ProtocolError,
                     RemoteError,
                     RequestExpired,
)
from .graph import DepsGraph, register_arg_in_fn
from .intake import run_id
from .message import Message
from .pipeline import Pipeline
from .reactor import Reactor, reactor

__version__ = "0.1.0"

__all__ = [
    "app", "create_app", "install", "reactor", "Reactor", "Pipeline", "Message", "DepsGraph",
    "register_arg_in_fn", "run_id", "FusionError", "ConfigurationError", "ProtocolError", "DepsMapError",
    "DependencyFailed", "DependencyTimeout", "RemoteError", "RequestExpired",
]
