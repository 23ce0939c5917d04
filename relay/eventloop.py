"""The event loop `postroom serve` and its SMTP workers run on: `server.event_loop`.

"auto" (the default) is uvloop when it is installed, else asyncio's own loop; "uvloop" requires
it; "asyncio" is the standard library's. uvloop runs the same code with its loop, transports and
timers in C: in bench/deliver.py the service spent 12% less CPU per message delivered.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from config import EventLoop

T = TypeVar("T")


class LoopUnavailable(RuntimeError):
    """`server.event_loop = "uvloop"` where uvloop is not installed."""


def resolve(choice: EventLoop) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` names on this machine."""
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not has_uvloop:
        raise LoopUnavailable(
            'server.event_loop = "uvloop", but uvloop is not installed '
            '(install it, or set "auto" or "asyncio")'
        )
    if choice == "asyncio" or not has_uvloop:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], choice: EventLoop) -> T:
    """`asyncio.run(main)` on the loop `choice` names."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        resolved = resolve(choice)
    except LoopUnavailable:
        main.close()  # never to run: no "never awaited" warning on the way out
        raise
    if resolved == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def name_of(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": what the ready log line says the service runs on."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def settle_heap() -> None:
    """Once start-up is done: collect, then move every object it made (modules, the settings,
    the app, pydantic's schemas) out of the cyclic collector's reach (`gc.freeze()`).

    Otherwise each full collection walks all of them again: under bench/accept_http.py, 12-13
    full collections in 10 s took 52-80 ms each in the service (7.7% of its time, each one a
    stall every request in flight waits out). After the freeze they take 2-5 ms. Reference
    counting still frees what start-up made; only a cycle among those objects that dies later
    (the settings a reload replaces) stays, once.
    """
    gc.collect()
    gc.freeze()
