"""EngineThread: every call runs on its one thread, in order; results and exceptions come back to
the caller; a caller that gives up does not stop the thread's next calls."""

import asyncio
import threading
import time

import pytest

from exo_core.engine import EngineThread


async def test_calls_run_on_one_thread_in_order_and_answer_their_caller():
    thread = EngineThread("exo-test")
    try:
        names, order = set(), []

        def work(i):
            names.add(threading.current_thread().name)
            order.append(i)
            return i * 2

        assert await asyncio.gather(*(thread.run(work, i) for i in range(20))) == [i * 2 for i in range(20)]
        assert order == list(range(20))
        assert len(names) == 1 and next(iter(names)).startswith("exo-test")
        assert threading.current_thread().name not in names  # never on the loop's thread

        def fail():
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await thread.run(fail)

        slow = asyncio.ensure_future(thread.run(time.sleep, 0.2))
        await asyncio.sleep(0.05)
        slow.cancel()  # the caller leaves; the thread finishes that call and goes on
        assert await thread.run(work, 21) == 42
    finally:
        thread.shutdown()
