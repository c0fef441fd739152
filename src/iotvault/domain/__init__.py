"""The pure core: identifiers, topics, events, accounts. No asyncio, SQL or HTTP imports here."""
