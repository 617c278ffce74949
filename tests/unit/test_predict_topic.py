"""Predictions over MQTT with the stored release (``device.serve_predictions``; issue 16); in memory.

The same through a real broker and the ``unus-edge predict --mqtt`` command is
``tests/integration/test_predict_topic.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_release import release
from tests.unit.test_service_memory import JOB, run, shards
from unus_edge import topics
from unus_edge.config import DeviceConfig, DeviceSettings
from unus_edge.device import Device, ask_prediction, load_release, predict, store_release
from unus_edge.device._serve import QUEUED, ReleaseCache, accept_prediction
from unus_edge.errors import ConfigError, MessageError
from unus_edge.messages import Prediction, PredictRequest, Release, decode_message, encode_message
from unus_edge.nn import Graph
from unus_edge.onnx_io import fingerprint, load_model, read_parameters
from unus_edge.topics import Channel, ParsedTopic
from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport
from unus_edge.zoo import build_mlp, resolve_model


def serving_device(broker: MemoryBroker, folder: Path, stop: asyncio.Event, **extra: object) -> Device:
    settings = DeviceSettings(id="pi-0", job=JOB, data="-", model="logreg", heartbeat_interval=0.2,
                              release_dir=str(folder), serve_predictions=True, **extra)  # type: ignore[arg-type]
    config = DeviceConfig(device=settings)
    model = resolve_model("logreg")
    return Device(config, MemoryTransport(broker, Device.connect_options(config, "s0")), graph=Graph(model),
                  fingerprint=fingerprint(model), dataset=shards(1)[0], session="s0", shutdown_trigger=stop)


def application(broker: MemoryBroker) -> MemoryTransport:
    return MemoryTransport(broker, ConnectOptions(host="127.0.0.1", client_id="local-app"))


def serving_event(device: Device, serving: asyncio.Event | None = None) -> asyncio.Event:
    """``serving`` (or a new event), set once ``device`` has subscribed to its prediction requests."""
    serving = asyncio.Event() if serving is None else serving
    subscribe = device.transport.subscribe

    async def spy(topic_filter: str, *, qos: int = 1) -> int:
        granted = await subscribe(topic_filter, qos=qos)
        if topic_filter.endswith("/predict/request"):
            serving.set()
        return granted

    device.transport.subscribe = spy  # type: ignore[method-assign]
    return serving


async def with_daemon(device: Device, stop: asyncio.Event, work: object) -> object:
    """Run the daemon, and ``work`` once it has subscribed to its prediction requests."""
    serving = serving_event(device)

    async def daemon() -> None:
        async with device.transport:
            await device.run()

    running = asyncio.create_task(daemon())
    try:
        await serving.wait()
        return await work  # type: ignore[misc]
    finally:
        stop.set()
        await running


def test_the_predict_topics_are_per_device_and_parse() -> None:
    request = topics.device_topic("mnist", "pi-3", Channel.PREDICT_REQUEST)
    assert request == "unus/v1/mnist/devices/pi-3/predict/request"
    assert topics.parse(request) == ParsedTopic("mnist", Channel.PREDICT_REQUEST, device_id="pi-3")
    response = topics.device_topic("mnist", "pi-3", Channel.PREDICT_RESPONSE)
    assert topics.parse(response) == ParsedTopic("mnist", Channel.PREDICT_RESPONSE, device_id="pi-3")
    with pytest.raises(Exception, match="bad_topic"):
        topics.parse("unus/v1/mnist/devices/pi-3/predict/other")


def test_a_request_is_checked() -> None:
    payload = encode_message(PredictRequest("r1", {"x": np.zeros((2, 784), np.float32)}), JOB,
                             Channel.PREDICT_REQUEST)
    _, decoded = decode_message(payload, Channel.PREDICT_REQUEST)
    assert isinstance(decoded, PredictRequest) and decoded.request_id == "r1"
    for bad in (PredictRequest("", {"x": np.zeros((1, 2), np.float32)}),
                PredictRequest("r", {"x": np.zeros(1, np.float32), "w": np.zeros(1, np.float32)})):
        with pytest.raises(MessageError):
            decode_message(encode_message(bad, JOB, Channel.PREDICT_REQUEST), Channel.PREDICT_REQUEST)


def test_serving_needs_a_release_folder() -> None:
    from unus_edge.config import load_device_config

    with pytest.raises(ConfigError, match="release_dir"):
        load_device_config(environ={}, overrides=["device.id=pi", "device.data=x.npz",
                                                  "device.serve_predictions=true"])


BACKENDS = ["auto", "numpy", pytest.param("litert", marks=pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None, reason="ai-edge-litert is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_daemon_answers_with_its_stored_release_and_says_which(tmp_path: Path, backend: str) -> None:
    store_release(tmp_path, release(3), resolve_model("logreg"))
    x = shards(1)[0].x[:7]

    async def scenario() -> tuple[Prediction, Prediction]:
        broker, stop = MemoryBroker(), asyncio.Event()
        device = serving_device(broker, tmp_path, stop, predict_backend=backend)

        async def ask() -> tuple[Prediction, Prediction]:
            async with application(broker) as transport:
                first = await ask_prediction(transport, JOB, "pi-0", x)
            store_release(tmp_path, release(4), resolve_model("logreg"))  # a new release: read again
            async with application(broker) as transport:
                return first, await ask_prediction(transport, JOB, "pi-0", x, request_id="second")

        return await with_daemon(device, stop, ask())  # type: ignore[return-value]

    first, second = run(scenario)
    assert first.error == "" and first.model_version == 3 and first.task == "classification"
    assert second.request_id == "second" and second.model_version == 4
    classes, probabilities = predict(load_release(tmp_path), x)
    assert list(second.classes) == classes.tolist()
    # predict() computes with onnxruntime; another backend sums float32 products in another order
    # (large logits here: a release of random weights), hence the looser bound for those.
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if backend == "auto" else {"rtol": 1e-3, "atol": 1e-5}
    np.testing.assert_allclose(np.asarray(second.tensors["y"]), probabilities, **tolerance)


def test_without_a_release_the_answer_says_so(tmp_path: Path) -> None:
    async def scenario() -> Prediction:
        broker, stop = MemoryBroker(), asyncio.Event()
        device = serving_device(broker, tmp_path / "empty", stop)

        async def ask() -> Prediction:
            async with application(broker) as transport:
                return await ask_prediction(transport, JOB, "pi-0", np.zeros((1, 784), np.float32))

        return await with_daemon(device, stop, ask())  # type: ignore[return-value]

    answer = run(scenario)
    assert answer.model_version == -1 and "no_release" in answer.error and not answer.classes


def test_inputs_the_model_cannot_take_are_answered_with_the_reason(tmp_path: Path) -> None:
    store_release(tmp_path, release(1), resolve_model("logreg"))
    answer = ReleaseCache(tmp_path).answer("pi-0", PredictRequest("r", {"x": np.zeros((2, 5), np.float32)}))
    assert answer.model_version == 1 and "bad_shape" in answer.error


def test_a_regression_release_answers_values(tmp_path: Path) -> None:
    model = load_model(build_mlp((4,), inputs=3, outputs=2, regression=True))
    params = read_parameters(model)
    store_release(tmp_path, Release(JOB, 2, 2, fingerprint(model), "agg", params, None, 0.5, "regression"), model)
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    answer = ReleaseCache(tmp_path, "numpy").answer("pi-0", PredictRequest("r", {"x": x}))
    assert answer.task == "regression" and answer.classes == () and answer.error == ""
    values, _ = predict(load_release(tmp_path), x)
    np.testing.assert_allclose(np.asarray(answer.tensors["y"]), values, rtol=1e-5)


def test_a_request_beyond_the_queue_is_answered_busy_at_once(tmp_path: Path) -> None:
    async def scenario() -> list[Prediction]:
        broker, stop = MemoryBroker(), asyncio.Event()
        device = serving_device(broker, tmp_path, stop)
        answers: list[Prediction] = []
        async with application(broker) as transport:
            await transport.subscribe(topics.device_topic(JOB, "pi-0", Channel.PREDICT_RESPONSE))
            async with device.transport, asyncio.TaskGroup() as group:
                for index in range(QUEUED + 1):  # nobody serves: the queue fills
                    accept_prediction(device, PredictRequest(f"r{index}", {"x": np.zeros((1, 784), np.float32)}),
                                      group)
            async for message in transport.messages():
                _, answer = decode_message(message.payload, Channel.PREDICT_RESPONSE)
                assert isinstance(answer, Prediction)
                answers.append(answer)
                break
        return answers

    (busy,) = run(scenario)
    assert busy.request_id == f"r{QUEUED}" and busy.error.startswith("busy")


def test_an_oversized_request_is_dropped_not_decoded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store_release(tmp_path, release(1), resolve_model("logreg"))

    async def scenario() -> Prediction:
        broker, stop = MemoryBroker(), asyncio.Event()
        device = serving_device(broker, tmp_path, stop, predict_max_bytes=4096)

        async def ask() -> Prediction:
            async with application(broker) as transport:
                big = PredictRequest("big", {"x": np.zeros((10, 784), np.float32)})  # 31 KB
                await transport.publish(topics.device_topic(JOB, "pi-0", Channel.PREDICT_REQUEST),
                                        encode_message(big, JOB, Channel.PREDICT_REQUEST))
                return await ask_prediction(transport, JOB, "pi-0", np.zeros((1, 784), np.float32))

        return await with_daemon(device, stop, ask())  # type: ignore[return-value]

    answer = run(scenario)
    assert answer.error == "" and answer.model_version == 1  # the small one after it is answered
    assert any("ignoring a message" in record.getMessage() and "predict/request" in record.getMessage()
               for record in caplog.records)


def test_a_request_sent_before_the_daemon_listens_is_sent_again(tmp_path: Path) -> None:
    store_release(tmp_path, release(2), resolve_model("logreg"))

    async def scenario() -> Prediction:
        broker, stop = MemoryBroker(), asyncio.Event()
        async with application(broker) as transport:
            asking = asyncio.create_task(ask_prediction(transport, JOB, "pi-0", np.zeros((1, 784), np.float32),
                                                        resend_seconds=0.1))
            await asyncio.sleep(0)  # let the first request go out, to nobody
            device = serving_device(broker, tmp_path, stop)

            async def daemon() -> None:
                async with device.transport:
                    await device.run()

            running = asyncio.create_task(daemon())
            try:
                return await asking
            finally:
                stop.set()
                await running

    answer = run(scenario)
    assert answer.error == "" and answer.model_version == 2
