"""Codec benchmark: encode + decode of a large update against the raw-bytes floor, same run.

Floor: ``arr.tobytes()`` + ``np.frombuffer`` (the least any serialisation can do: one copy out,
zero-copy in). Goal: within 3x of the floor; wire overhead under 0.1% for 1M-parameter models.

    python bench/bench_codec.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from unus_edge.codec import Envelope, SparseTensor, decode, encode


def best_of(function: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}

    weights = rng.standard_normal(10_000_000).astype(np.float32)
    envelope = Envelope("update", "bench", {"server_round": 1, "num_examples": 600}, {"w": weights})
    payload = encode(envelope)
    floor = best_of(lambda: np.frombuffer(weights.tobytes(), dtype=np.float32), repeats)
    encode_time = best_of(lambda: encode(envelope), repeats)
    decode_time = best_of(lambda: decode(payload), repeats)
    results["10M_float32"] = {
        "floor_ms": floor * 1e3,
        "encode_ms": encode_time * 1e3,
        "decode_ms": decode_time * 1e3,
        "ratio_vs_floor": (encode_time + decode_time) / floor,
    }

    # A realistic 1M-parameter model: several tensors with names.
    model = {
        "conv1.weight": rng.standard_normal((32, 1, 5, 5)).astype(np.float32),
        "conv1.bias": np.zeros(32, np.float32),
        "fc1.weight": rng.standard_normal((1000, 990)).astype(np.float32),
        "fc1.bias": np.zeros(1000, np.float32),
        "fc2.weight": rng.standard_normal((10, 1000)).astype(np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }
    raw = sum(t.nbytes for t in model.values())
    one_million = encode(Envelope("update", "bench", {"server_round": 1, "num_examples": 600}, model))
    results["1M_model"] = {
        "parameters": sum(t.size for t in model.values()),
        "raw_bytes": raw,
        "wire_bytes": len(one_million),
        "overhead_bytes": len(one_million) - raw,
        "overhead_percent": 100 * (len(one_million) - raw) / raw,
    }
    # Sparse (top-1% entries) as Distributed Selective SGD and top-k compression send.
    top = np.argsort(-np.abs(weights[:1_000_000]))[:10_000]
    sparse = encode(Envelope("update", "bench", {}, {"w": SparseTensor.from_dense(weights[:1_000_000], top)}))
    results["sparse_1pct_of_1M"] = {"wire_bytes": len(sparse), "dense_bytes": 4_000_000}

    if args.json:
        print(json.dumps(results))
        return
    r = results["10M_float32"]
    print("codec: 10M float32 (40 MB) update")
    print(f"  floor tobytes+frombuffer  {r['floor_ms']:8.2f} ms")
    print(f"  encode                    {r['encode_ms']:8.2f} ms")
    print(f"  decode (validated)        {r['decode_ms']:8.3f} ms")
    print(f"  encode+decode / floor     {r['ratio_vs_floor']:8.2f} x   (goal: <= 3x)")
    m = results["1M_model"]
    print(f"codec: {m['parameters']:,}-parameter model, 6 tensors")
    print(f"  wire overhead             {m['overhead_bytes']} B = {m['overhead_percent']:.4f} %   (goal: < 0.1 %)")
    s = results["sparse_1pct_of_1M"]
    print(f"codec: sparse top-1% of 1M floats: {s['wire_bytes']:,} B on the wire vs {s['dense_bytes']:,} B dense")


if __name__ == "__main__":
    main()
