"""Call a fusion reactor with Faust's ``agent.ask`` (faust-streaming).

    python caller.py SERVERS TOPIC DATA [--record]

The agent here only names the reactor's topic: this program starts the app as a
client (``agent.ask`` does that), so the agent never consumes; the fusion reactor
serves the topic.  By default ``agent.ask`` sends DATA as it is with the headers
``Faust-Ag-ReplyTo`` and ``Faust-Ag-CorrelationId``; with ``--record`` the agent has
``use_reply_headers=False`` and sends a ``ReqRepRequest`` record.  The reactor
answers with a ``ReqRepResponse`` record on the app's reply topic
(``f-reply-<uuid>``), which the deployment admits with ``fusion_reply_allowlist``
(``f-reply-[0-9a-f-]{36}``).  ``reply_create_topic=True`` makes Faust create that
topic when the app starts, before the request goes out, so the answer always has
a topic to go to.  Prints the answer's JSON; an error answer (``{"error": ...}``)
goes to stderr with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile

import faust


async def ask(servers: str, topic: str, data: object, record: bool) -> object:
    app = faust.App("fusion-faust-caller", broker=f"kafka://{servers}", value_serializer="json",
                    reply_create_topic=True, web_enabled=False, datadir=tempfile.mkdtemp(prefix="faust-caller-"))

    @app.agent(app.topic(topic, value_serializer="json"), use_reply_headers=not record)
    async def reactor(stream):  # never runs in this program: a fusion reactor serves the topic
        async for _ in stream:
            pass

    return await asyncio.wait_for(reactor.ask(data), 60)


def main() -> int:
    servers, topic, data = sys.argv[1:4]
    loop = asyncio.new_event_loop()
    answer = loop.run_until_complete(ask(servers, topic, json.loads(data), "--record" in sys.argv[4:]))
    if isinstance(answer, dict) and set(answer) == {"error"}:
        print(json.dumps(answer), file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A client-only Faust app does not stop: its stop waits for the reply stream to acknowledge the answer it
    # handed to agent.ask, which never happens.  The answer is out; leave without stopping it.
    os._exit(code)
