"""A release on demand from a stopped job's checkpoint, and releases that come again (issue 16)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_release import release
from tests.unit.test_service_memory import JOB, config, make_aggregator, make_device, run, run_device, shards
from unus_edge import topics
from unus_edge.aggregator import publish_release, release_from_checkpoint
from unus_edge.cli import main
from unus_edge.device import load_release, predict, store_release
from unus_edge.device._release import already_stored
from unus_edge.errors import ConfigError, JobError
from unus_edge.messages import Release, Status, decode_message, encode_message
from unus_edge.onnx_io import fingerprint, load_model, read_parameters
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport
from unus_edge.zoo import build_mlp, resolve_model


def reader(broker: MemoryBroker) -> MemoryTransport:
    return MemoryTransport(broker, ConnectOptions(host="127.0.0.1", client_id="releaser"))


def stopped_job(tmp_path: Path) -> tuple[MemoryBroker, dict[str, np.ndarray], int]:
    """A job of 2 rounds that did not release (job.release = false), with its checkpoint."""

    async def scenario() -> tuple[MemoryBroker, dict[str, np.ndarray], int]:
        broker = MemoryBroker()
        job = config(job__min_devices=1, job__release="false", checkpoint__dir=str(tmp_path / "ckpt"))
        aggregator = make_aggregator(broker, job)
        device = make_device(broker, "d0", shards(1)[0])
        running = asyncio.create_task(run_device(device))
        async with aggregator.transport:
            result = await aggregator.run()
        await running
        return broker, result.params, result.version

    return run(scenario)  # type: ignore[no-any-return]


def test_a_stopped_jobs_checkpoint_is_released_to_the_fleet(tmp_path: Path) -> None:
    broker, params, version = stopped_job(tmp_path)
    assert topics.release(JOB) not in broker.retained  # the job itself did not release
    job = config(checkpoint__dir=str(tmp_path / "ckpt"))
    made = release_from_checkpoint(job)
    assert made.job == JOB and made.version == version and made.server_round == 2
    assert made.eval_accuracy is not None and made.task == "classification"
    for name, value in params.items():
        np.testing.assert_array_equal(made.tensors[name], value)
    run(lambda: publish_release(job, made, transport=reader(broker), status_wait=0.2))
    _, retained = decode_message(broker.retained[topics.release(JOB)].payload, Channel.RELEASE)
    assert isinstance(retained, Release) and retained.version == version
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(retained.tensors[name]), value)


def test_a_release_is_refused_while_the_jobs_aggregator_is_online_unless_forced(tmp_path: Path) -> None:
    stopped_job(tmp_path)
    broker = MemoryBroker()
    online = encode_message(Status("aggregator", "online", "agg-2", role="aggregator"), JOB,
                            Channel.AGGREGATOR_STATUS)
    run(lambda: _publish_retained(broker, topics.aggregator_status(JOB), online))
    job = config(checkpoint__dir=str(tmp_path / "ckpt"))
    made = release_from_checkpoint(job)
    with pytest.raises(JobError, match="aggregator is online"):
        run(lambda: publish_release(job, made, transport=reader(broker), status_wait=5))
    assert topics.release(JOB) not in broker.retained
    run(lambda: publish_release(job, made, transport=reader(broker), force=True, status_wait=5))
    assert topics.release(JOB) in broker.retained


async def _publish_retained(broker: MemoryBroker, topic: str, payload: bytes) -> None:
    async with MemoryTransport(broker, ConnectOptions(host="127.0.0.1", client_id="aggregator")) as transport:
        await transport.publish(topic, payload, qos=1, retain=True)


def test_a_release_needs_this_jobs_checkpoint_of_this_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.dir"):
        release_from_checkpoint(config())
    with pytest.raises(JobError, match="no checkpoint"):
        release_from_checkpoint(config(checkpoint__dir=str(tmp_path / "empty")))
    stopped_job(tmp_path)
    with pytest.raises(JobError, match="job 'fleet'"):
        release_from_checkpoint(config(job__name="fleet", checkpoint__dir=str(tmp_path / "ckpt")))
    with pytest.raises(JobError, match=r"is not model\.source"):
        release_from_checkpoint(config(model__source="mnist_2nn", checkpoint__dir=str(tmp_path / "ckpt")))


def test_the_release_command_refuses_a_missing_checkpoint_by_name(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text(f'[job]\nname = "{JOB}"\n[model]\nsource = "logreg"\n[checkpoint]\ndir = "{tmp_path / "none"}"\n')
    assert main(["release", "--config", str(toml)]) != 0
    assert f"no checkpoint in {tmp_path / 'none'}" in capsys.readouterr().err


def test_the_same_release_arriving_again_keeps_the_previous_one(tmp_path: Path) -> None:
    model = resolve_model("logreg")
    store_release(tmp_path, release(1), model)
    store_release(tmp_path, release(2), model)
    assert already_stored(tmp_path, release(2)) and not already_stored(tmp_path, release(1))
    assert not already_stored(tmp_path / "absent", release(2))
    assert load_release(tmp_path).version == 2


def test_a_regression_release_predicts_values(tmp_path: Path) -> None:
    model_path = tmp_path / "regressor.onnx"
    model_path.write_bytes(build_mlp((4,), inputs=3, outputs=2, regression=True))
    model = load_model(model_path)
    params = read_parameters(model)
    made = Release(JOB, 3, 3, fingerprint(model), "agg", params, None, 0.25, "regression")
    store_release(tmp_path / "rel", made, model)
    stored = load_release(tmp_path / "rel")
    assert stored.task == "regression" and stored.meta["eval_mse"] == 0.25
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    values, same = predict(stored, x)
    assert values.shape == (2, 2) and values is same
