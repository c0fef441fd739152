"""The baseline: iotvault's own MQTT transport with a pipeline that only acknowledges.

``python -m bench.ackonly TARGET`` runs an iotvault ingest node (``Role.INGEST``) from the
``IOTVAULT_*`` environment, exactly as ``iotvault serve`` would build it — the gmqtt MQTT 5
subscriber with manual acknowledgement for an external broker, or the embedded amqtt broker
with its publish hook and device authentication — except that the pipeline's entry point
(``IngestPipeline.enqueue``, which ``submit`` awaits) completes at once: no batching,
validation, encryption or commit. So the ratio iotvault / ack-only is the cost of everything
iotvault does between "received" and "acknowledged", with the same client library, the same
broker and the same publishers.

Prints ``{"ready": true}`` when the node is up, ``{"probe": true}`` when the first status
message arrives (the subscription is in place), and ``{"done": N, "t_last": ...}`` once the
N-th event message has been acknowledged (``t_last``: ``time.monotonic()``, system-wide on
Linux).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import iotvault.node
from iotvault.config import load_settings
from iotvault.ingest.pipeline import Inbound, IngestPipeline, Outcome


class AckOnlyPipeline(IngestPipeline):
    target = 0
    seen = 0
    probed = False

    def enqueue(self, msg: Inbound) -> asyncio.Future[Outcome]:
        """Acknowledge at once (``submit`` awaits this too)."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        fut.set_result(Outcome.STORED)
        if "/evt/" in msg.topic:
            cls = AckOnlyPipeline
            cls.seen += 1
            if cls.seen == cls.target:
                # the acknowledgement follows as soon as this returns
                print(json.dumps({"done": cls.seen, "t_last": time.monotonic()}), flush=True)
        elif not AckOnlyPipeline.probed:
            AckOnlyPipeline.probed = True
            print(json.dumps({"probe": True}), flush=True)
        return fut


def main() -> None:
    AckOnlyPipeline.target = int(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    iotvault.node.IngestPipeline = AckOnlyPipeline  # type: ignore[attr-defined]
    node = iotvault.node.Node(load_settings(), iotvault.node.Role.INGEST)
    asyncio.run(node.run(lambda _n: print(json.dumps({"ready": True}), flush=True)))


if __name__ == "__main__":
    main()
