"""`celery fusion` commands (filled in by the pipeline/CLI work)."""

import click


@click.group(name="fusion", help="fusion-celery: call reactors, inspect return topics and waits.")
def fusion() -> None:
    pass
