"""Durability: acknowledged means checkpointed; a restarted aggregator resumes mid-round; the
audit log lists every applied update exactly once; checkpoints survive SIGKILL mid-write."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_service_memory import JOB, aggregator_online, config, make_aggregator
from unus_edge import topics
from unus_edge.aggregator import load_checkpoint
from unus_edge.aggregator._checkpoint import read_audit
from unus_edge.aggregator._driver import RoundDriver
from unus_edge.messages import Ack, Registration, Status, Task, Update, decode_message, encode_message
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport


class ScriptedDevice:
    """A device driven by the test: registers, receives its task, sends chosen updates."""

    def __init__(self, broker: MemoryBroker, device_id: str) -> None:
        self.device_id = device_id
        self.transport = MemoryTransport(broker, ConnectOptions(client_id=f"fake-{device_id}", clean_session=False))
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.listener: asyncio.Task[None] | None = None

    async def start(self, fingerprint: str) -> None:
        await self.transport.connect()
        await self.transport.subscribe(topics.device_topic(JOB, self.device_id, Channel.TASKS))

        async def listen() -> None:
            async for message in self.transport.messages():
                self.inbox.put_nowait(decode_message(message.payload, Channel.TASKS)[1])

        self.listener = asyncio.create_task(listen())
        await self.send(Channel.STATUS, Status(self.device_id, "online", "s"))
        await self.send(Channel.REGISTER, Registration(self.device_id, "s", 100, fingerprint, "test"))

    async def send(self, channel: Channel, message: object, msg_id: str | None = None) -> None:
        payload = encode_message(message, JOB, channel, msg_id=msg_id)  # type: ignore[arg-type]
        spec = topics.TOPIC_SPECS[channel]
        await self.transport.publish(topics.device_topic(JOB, self.device_id, channel), payload, qos=1,
                                     retain=spec.retain)

    async def next(self, kind: type) -> object:
        while True:
            item = await self.inbox.get()
            if isinstance(item, kind):
                return item

    def update(self, task: Task, params: dict[str, np.ndarray], value: float) -> Update:
        return Update(self.device_id, "s", task.task_id, task.server_round, task.model_version, 100, 0.5,
                      {n: np.full_like(v, value) for n, v in params.items()})


def test_a_restarted_aggregator_resumes_the_round_and_applies_every_update_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        settings = config(job__min_devices=3, job__rounds=1, evaluation__dataset="none",
                          checkpoint__dir=str(tmp_path))
        first = make_aggregator(broker, settings)
        devices = [ScriptedDevice(broker, f"d{i}") for i in range(3)]
        async with first.transport:
            job = asyncio.create_task(first.run())
            await aggregator_online(broker)
            for device in devices:
                await device.start(first.fingerprint)
            tasks = [await device.next(Task) for device in devices]
            await devices[0].send(Channel.UPDATE, devices[0].update(tasks[0], first.params, 1.0), msg_id="u0")
            ack = await devices[0].next(Ack)
            assert isinstance(ack, Ack)
            assert ack.accepted  # sent only after the checkpoint that holds the update
            job.cancel()  # the aggregator "crashes": no graceful shutdown, no final checkpoint
            with pytest.raises(asyncio.CancelledError):
                await job
        totals = first.counters.as_dict()
        second = make_aggregator(broker, settings, resume=True)  # same checkpoint dir
        # The job totals go on from the checkpoint (they were lost on every restart before).
        assert second.counters.bytes_up > 0 and second.counters.accepted > 0
        assert second.counters.bytes_up <= totals["bytes_up"] and second.counters.accepted <= totals["accepted"]
        assert isinstance(second.driver, RoundDriver)
        assert second.driver.current_round is not None  # the round in progress came back with the checkpoint
        assert list(second.driver.current_round.accepted) == ["d0"]
        async with second.transport:
            job = asyncio.create_task(second.run())
            await aggregator_online(broker)
            for device in devices:
                await device.send(Channel.REGISTER, Registration(device.device_id, "s", 100, second.fingerprint, "t"))
            # d0 re-publishes its update (it cannot know it was applied): acknowledged, not applied again.
            await devices[0].send(Channel.UPDATE, devices[0].update(tasks[0], first.params, 1.0), msg_id="u0")
            for index in (1, 2):
                await devices[index].send(Channel.UPDATE, devices[index].update(tasks[index], first.params, 3.0),
                                          msg_id=f"u{index}")
            result = await job
        assert result.state == "finished"
        assert result.history[-1].num_updates == 3
        name = next(iter(result.params))
        initial = first.params[name]
        np.testing.assert_allclose(result.params[name], initial + (1.0 + 3.0 + 3.0) / 3, rtol=1e-6)
        audit = read_audit(tmp_path)
        assert sorted(entry["msg_id"] for entry in audit) == ["u0", "u1", "u2"]
        for device in devices:
            if device.listener:
                device.listener.cancel()

    asyncio.run(scenario())


_WRITER = """
import sys, numpy as np
from pathlib import Path
from unus_edge.aggregator import Checkpoint, save_checkpoint
directory = Path(sys.argv[1])
params = {"w": np.zeros(2_000_000, np.float32)}
for version in range(1, 100000):
    params["w"][:] = version
    save_checkpoint(directory, Checkpoint("job", "sha256:x", version, version, params, {}))
    print(version, flush=True)
"""


def test_a_checkpoint_survives_sigkill_in_the_middle_of_writing(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert writer.stdout is not None
    last = 0
    for line in writer.stdout:
        last = int(line)
        if last >= 5:  # several complete writes; the sixth is under way when the signal lands
            writer.kill()
            break
    writer.wait()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.version >= last  # the last completed write (or the one after it) is there, whole
    assert float(loaded.params["w"][0]) == loaded.version
    assert np.all(loaded.params["w"] == loaded.version)
