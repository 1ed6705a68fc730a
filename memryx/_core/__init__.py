"""The asyncio core: channels, model lanes, the engine, and the thread bridge.

Threads are started, and calls cross from one thread to another, only in
:mod:`.threads` (the thread bridge); :mod:`.aio` holds the async primitives
(Channel, Budget, TaskSet) and :mod:`.workers` the persistent callback threads.
"""
