"""The pure core: identifiers, topics, events. No asyncio, SQL or HTTP imports here."""
