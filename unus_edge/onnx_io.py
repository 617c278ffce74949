"""Read, write, fingerprint and evaluate ONNX models without the ``onnx`` package.

A device has numpy and paho-mqtt, nothing else, so unus-edge parses the ONNX protobuf
schema itself on top of :mod:`unus_edge._protobuf`. Design decisions:

* **An immutable parsed view.** :func:`load_model` returns an :class:`OnnxModel`: nodes,
  initializers (read-only arrays), graph inputs/outputs with dtypes and shapes, the default
  opset. Only the fields the engine needs are decoded; every other field (doc strings,
  metadata, value_info, training_info, unknown future fields) is skipped on reading and
  **copied byte for byte** on writing, so a model written back by :func:`model_bytes` keeps
  everything the user put in it.
* **Parameters are the floating-point initializers**; their names are the wire keys the
  federated protocol exchanges. Integer initializers (a Reshape's target shape...) are part of
  the structure, never exchanged.
* **Writing replaces only the parameter initializers.** :func:`model_bytes` re-encodes the
  ``TensorProto`` of each parameter (dims, data_type, name, raw_data, in field-number order as
  the reference serializer does) and copies every other field verbatim.
* **The fingerprint hashes structure, not weights**: a canonical JSON of opsets, nodes
  (op, domain, edges, attributes), graph inputs/outputs, initializer names, shapes and dtypes,
  and the *values* of non-parameter initializers. Node names, doc strings, producer fields and
  protobuf field order do not enter it.
* **Evaluation** prefers onnxruntime when it is installed (one ``InferenceSession`` built from a
  rewrite of the model in which the parameters are graph inputs, so new weights are fed per
  call without rebuilding the session) and otherwise runs the NumPy engine of
  :mod:`unus_edge.nn`.

Layout: this module is the public face and re-exports everything from three private modules,
each with one job: :mod:`unus_edge._onnx_schema` (the protobuf schema: tensors, attributes,
nodes, value infos, both ways), :mod:`unus_edge._onnx_model` (:class:`OnnxModel`: loading,
parameters, writing back, fingerprint) and :mod:`unus_edge._onnx_eval` (:class:`Evaluator`).
"""

from __future__ import annotations

from unus_edge._onnx_eval import EvalResult, Evaluator, prepare_input
from unus_edge._onnx_eval import softmax_cross_entropy as softmax_cross_entropy  # for nn, not in __all__
from unus_edge._onnx_model import (
    OnnxModel,
    check_parameters,
    encode_model,
    fingerprint,
    load_model,
    model_bytes,
    read_parameters,
    save_model,
)
from unus_edge._onnx_schema import AttributeValue, Node, RawAttribute, ValueInfo

__all__ = [
    "AttributeValue",
    "EvalResult",
    "Evaluator",
    "Node",
    "OnnxModel",
    "RawAttribute",
    "ValueInfo",
    "check_parameters",
    "encode_model",
    "fingerprint",
    "load_model",
    "model_bytes",
    "prepare_input",
    "read_parameters",
    "save_model",
]
