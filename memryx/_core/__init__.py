"""The asyncio core: channels, model lanes, the engine, and the thread bridge."""
