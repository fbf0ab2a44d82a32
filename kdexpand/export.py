"""ONNX export of a contracted model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from kdexpand.io import atomic_write

__all__ = ["ExportError", "export_onnx"]

logger = logging.getLogger(__name__)

# Expanded units would export as several Conv/Gemm nodes or as kernel-composition
# subgraphs; a contracted model has exactly one node per compact conv or linear layer.
_LINEAR_OPS = {"Conv": nn.Conv2d, "Gemm": nn.Linear}


class ExportError(RuntimeError):
    """The ONNX graph differs from the model in structure or outputs."""


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, check_inputs: torch.Tensor, tolerance: float = 1e-4
) -> dict[str, float | int]:
    """Export ``model`` to ONNX and check the graph and its outputs.

    Three checks run. The onnx checker must pass. The graph must have as many Conv nodes as
    the model has ``nn.Conv2d`` modules and no more Gemm/MatMul nodes than ``nn.Linear``
    modules. The onnxruntime outputs on ``check_inputs`` must differ from PyTorch's by at
    most ``tolerance * max(1, max |PyTorch output|)``.

    Args:
        model: A contracted model of plain torch layers, in eval mode.
        example: Input used for tracing; the batch dimension is exported as dynamic.
        path: Destination ``.onnx`` file.
        check_inputs: Inputs (a validation batch) to compare the two runtimes on.
        tolerance: Relative bound of the output check.

    Returns:
        ``onnx_max_abs_diff`` and the node counts by type of the linear layers.

    Raises:
        ExportError: A check fails.
    """
    model = model.eval().cpu()
    example, check_inputs = example.cpu(), check_inputs.cpu()

    def write(temp: Path) -> None:
        torch.onnx.export(
            model, (example,), str(temp), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False,
        )

    atomic_write(path, write)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)

    ops = Counter(node.op_type for node in graph.graph.node)
    modules = Counter(type(module) for module in model.modules())
    if ops["Conv"] != modules[nn.Conv2d]:
        raise ExportError(f"ONNX graph has {ops['Conv']} Conv nodes for {modules[nn.Conv2d]} Conv2d layers: {dict(ops)}")
    if ops["Gemm"] + ops["MatMul"] > modules[nn.Linear]:
        raise ExportError(f"ONNX graph has more Gemm/MatMul nodes than the {modules[nn.Linear]} Linear layers: {dict(ops)}")

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_outputs,) = session.run(None, {"input": check_inputs.numpy()})
    with torch.no_grad():
        reference = model(check_inputs).numpy()
    difference = float(np.abs(onnx_outputs - reference).max())
    bound = tolerance * max(1.0, float(np.abs(reference).max()))
    if not difference <= bound:  # NaN compares False, so it fails here too
        raise ExportError(f"onnxruntime outputs differ from PyTorch by {difference:.3g} > {bound:.3g}")
    logger.info("exported %s: %s, max abs diff to PyTorch %.3g", path, dict(ops), difference)
    return {"onnx_max_abs_diff": difference, "onnx_conv_nodes": ops["Conv"], "onnx_gemm_nodes": ops["Gemm"] + ops["MatMul"]}
