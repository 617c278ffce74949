"""Aggregation cost per update, against bare NumPy floors measured in the same run.

For a model of 1M and of 10M float32 parameters (one tensor), with one dense update:

* ``WeightedMean.add`` (the default accumulator: float64 sums, chunked, see
  ``unus_edge/strategies/_base.py``) against
  - the float32 floor ``np.multiply(delta, w, out=scratch); np.add(acc, scratch, out=acc)``,
  - the float64 floor: the same two ufuncs into float64 ``acc``/``scratch`` (the least float64
    work; the better of a full-size scratch and a 256 Ki-element chunked scratch);
* ``FedAvg.aggregate`` (once per round: mean in float64, cast, add to the global model) against
  ``np.multiply(acc64, 1/W, out=mean32); np.add(global32, mean32, out=new32)``;
* the rest of the per-update path in the aggregator: ``decode_message`` of the CBOR update
  (with the aggregator's model-derived limits) and ``check_tensors``; and the whole per-update
  cost (decode + check + add) against the float32 floor.

Timings are the best of several repeats (median shown too). WeightedMean accumulates in float64
on purpose (reproducible, arrival-order-independent sums); the float32 ratio shows what that costs.
Goal: ``WeightedMean.add`` within 2x of the float32 floor.

    python bench/bench_aggregation.py [--quick] [--json] [--sizes 1000000 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import (
    add_blas_flag,
    add_common_flags,
    emit,
    ensure_blas_threads,
    load_average,
    machine,
    say,
    setup_output,
    verdict,
)

from unus_edge.aggregator import check_tensors
from unus_edge.codec import Limits
from unus_edge.messages import Update, decode_message, encode_message
from unus_edge.strategies import ClientUpdate, FedAvg, WeightedMean
from unus_edge.topics import Channel

GOAL = 2.0
CHUNK = 1 << 18
WEIGHT = 600  # n_k: an integer weight, as FedAvg uses


def timed(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds over ``repeats`` calls, after one untimed call."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return min(samples), statistics.median(samples)


def aggregator_limits(template: dict[str, np.ndarray]) -> Limits:
    """The limits ``Aggregator._limits`` derives from its model."""
    elements = sum(int(v.size) for v in template.values())
    model_bytes = sum(int(v.nbytes) for v in template.values())
    return Limits(max_payload_bytes=model_bytes + model_bytes // 20 + 65_536, max_tensors=len(template),
                  max_elements=elements)


def measure(size: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(size)
    template = {"w": np.zeros(size, dtype=np.float32)}
    delta = (rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3))
    weight = float(WEIGHT)

    # --- floors: the bare multiply-add
    acc32 = np.zeros(size, dtype=np.float32)
    scratch32 = np.empty(size, dtype=np.float32)

    def floor32() -> None:
        np.multiply(delta, weight, out=scratch32)
        np.add(acc32, scratch32, out=acc32)

    acc64 = np.zeros(size, dtype=np.float64)
    scratch64 = np.empty(size, dtype=np.float64)
    small64 = np.empty(CHUNK, dtype=np.float64)

    def floor64_full() -> None:
        np.multiply(delta, weight, out=scratch64, dtype=np.float64)
        np.add(acc64, scratch64, out=acc64)

    def floor64_chunked() -> None:
        for start in range(0, size, CHUNK):
            stop = min(start + CHUNK, size)
            part = small64[: stop - start]
            np.copyto(part, delta[start:stop])  # cast by copy, then multiply in place: the fastest float64 way
            np.multiply(part, weight, out=part)
            np.add(acc64[start:stop], part, out=acc64[start:stop])

    # --- ours: WeightedMean.add with a ClientUpdate holding a decoded (read-only view) delta
    update = Update("device-000", "s" * 16, "r1.0.device-000", 1, 0, WEIGHT, 0.5, {"w": delta})
    payload = encode_message(update, "bench", Channel.UPDATE)
    limits = aggregator_limits(template)
    _, decoded = decode_message(payload, Channel.UPDATE, limits=limits)
    assert isinstance(decoded, Update)
    client = ClientUpdate(decoded.device_id, decoded.num_examples, decoded.tensors, 0, decoded.train_loss)
    accumulator = WeightedMean(template)

    def ours_add() -> None:
        accumulator.add(client)

    def ours_decode() -> None:
        decode_message(payload, Channel.UPDATE, limits=limits)

    def ours_check() -> None:
        if check_tensors(decoded.tensors, template) is not None:
            raise AssertionError("the update should pass check_tensors")

    def ours_update_path() -> None:
        _, message = decode_message(payload, Channel.UPDATE, limits=limits)
        assert isinstance(message, Update)
        if check_tensors(message.tensors, template) is not None:
            raise AssertionError
        accumulator.add(ClientUpdate(message.device_id, message.num_examples, message.tensors, 0, message.train_loss))

    # --- finalisation, once per round
    strategy = FedAvg()
    global_params = {"w": rng.standard_normal(size, dtype=np.float32)}
    inverse = 1.0 / accumulator.total_weight if accumulator.total_weight else 1.0
    mean32 = np.empty(size, dtype=np.float32)
    new32 = np.empty(size, dtype=np.float32)

    def floor_finalise() -> None:
        np.multiply(accumulator.sums["w"], inverse, out=mean32, casting="same_kind")
        np.add(global_params["w"], mean32, out=new32)

    def ours_finalise() -> None:
        strategy.aggregate(1, global_params, accumulator, [])

    def memcpy() -> None:
        np.copyto(scratch32, delta)

    results: dict[str, Any] = {"parameters": size, "update_bytes": len(payload)}
    order: list[tuple[str, Callable[[], object]]] = [
        ("floor_f32", floor32), ("floor_f64_full", floor64_full), ("floor_f64_chunked", floor64_chunked),
        ("add", ours_add), ("decode", ours_decode), ("check_tensors", ours_check),
        ("update_path", ours_update_path), ("floor_finalise", floor_finalise), ("finalise", ours_finalise),
        ("memcpy_f32", memcpy),
    ]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in order}
    for _ in range(3):  # interleave the contenders; keep the best of each
        for name, function in order:
            samples[name].append(timed(function, repeats))
    for name, values in samples.items():
        results[name] = {"best_ms": 1e3 * min(v[0] for v in values),
                         "median_ms": 1e3 * statistics.median(v[1] for v in values)}
    results["floor_f64"] = min((results["floor_f64_full"], results["floor_f64_chunked"]),
                               key=lambda r: r["best_ms"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, data=False)
    add_blas_flag(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    repeats = 5 if args.quick else 15
    say(f"aggregation per update, best of 3 x {repeats} (median in brackets); load average {load_average():.2f}")
    figures: dict[str, Any] = {"machine": machine(), "goal_ratio_vs_f32_floor": GOAL, "sizes": {}}
    for size in args.sizes:
        r = measure(size, repeats)
        figures["sizes"][str(size)] = r
        best = {name: r[name]["best_ms"] for name in r if isinstance(r[name], dict)}
        ratio32 = best["add"] / best["floor_f32"]
        ratio64 = best["add"] / best["floor_f64"]
        ratio_final = best["finalise"] / best["floor_finalise"]
        ratio_path = best["update_path"] / best["floor_f32"]
        r["ratios"] = {"add_vs_f32_floor": ratio32, "add_vs_f64_floor": ratio64,
                       "finalise_vs_floor": ratio_final, "update_path_vs_f32_floor": ratio_path,
                       "goal_met": ratio32 <= GOAL}
        say(f"\n{size:,} float32 parameters (update payload {r['update_bytes'] / 1e6:.1f} MB)")

        def line(label: str, name: str, extra: str = "", r: dict[str, Any] = r) -> None:
            say(f"  {label:44} {r[name]['best_ms']:9.2f} ms  [{r[name]['median_ms']:8.2f}]  {extra}")

        line("floor f32: multiply + add", "floor_f32")
        line("floor f64: multiply + add, full scratch", "floor_f64_full")
        line("floor f64: cast + multiply + add, 256Ki chunks", "floor_f64_chunked")
        line("memcpy of the delta (bandwidth reference)", "memcpy_f32")
        line("WeightedMean.add", "add", f"x{ratio32:.2f} f32 floor, x{ratio64:.2f} f64 floor  "
                                       f"(goal <= x{GOAL:.0f} f32: {verdict(ratio32 <= GOAL)})")
        line("decode_message (CBOR update, zero-copy)", "decode")
        line("check_tensors", "check_tensors")
        line("per update: decode + check + add", "update_path", f"x{ratio_path:.2f} f32 floor")
        line("floor finalise: mean cast + add", "floor_finalise")
        line("FedAvg.aggregate (once per round)", "finalise", f"x{ratio_final:.2f} its floor")
    figures["load_average_end"] = load_average()
    emit(figures)


if __name__ == "__main__":
    main()
