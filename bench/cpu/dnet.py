"""Folded DiracNet-18/34: random weights, safetensors, ONNX graph, NumPy reference.

Only NumPy is needed to import this module; `onnx` and `safetensors` are imported
where they are used, so the PyTorch runner can run under any Python that has torch
and NumPy.

Network (PyTorch semantics, NCHW input [N, 3, 224, 224], f32):
  conv 7x7 s2 p3 (+bias) -> maxpool k3 s2 p1
  -> for g in 0..4: [ReLU -> conv 3x3 p1 (+bias)] x blocks[g]; maxpool k2 s2 (g < 3)
  -> ReLU -> global average pool -> fc (y = x W^T + b)
"""

import json
import math

import numpy as np

BLOCKS = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}
STEM = 64
WIDTHS = (64, 128, 256, 512)
CLASSES = 1000


def gflop_per_image(depth):
    """2 x MACs of the convolutions and the fc (bias, ReLU, pooling ignored)."""
    macs = 112 * 112 * STEM * 3 * 7 * 7
    hw, c_in = 56, STEM
    for g, n in enumerate(BLOCKS[depth]):
        for _ in range(n):
            macs += hw * hw * WIDTHS[g] * c_in * 9
            c_in = WIDTHS[g]
        if g < 3:
            hw //= 2
    macs += WIDTHS[-1] * CLASSES
    return 2 * macs / 1e9


def layer_names(depth):
    """(prefix, c_out, c_in, k) for every conv, in forward order."""
    out = [("features.conv", STEM, 3, 7)]
    c_in = STEM
    for g, n in enumerate(BLOCKS[depth]):
        for b in range(n):
            out.append((f"features.group{g}.block{b}.conv", WIDTHS[g], c_in, 3))
            c_in = WIDTHS[g]
    return out


def random_weights(depth, seed=0):
    """He-normal convolution / fc weights, small uniform biases; f32, ordered dict."""
    rng = np.random.default_rng(seed + depth)
    w = {}
    for name, c_out, c_in, k in layer_names(depth):
        fan_in = c_in * k * k
        w[f"{name}.weight"] = (rng.standard_normal((c_out, c_in, k, k)) * math.sqrt(2.0 / fan_in)).astype(np.float32)
        w[f"{name}.bias"] = rng.uniform(-0.05, 0.05, c_out).astype(np.float32)
    c = WIDTHS[-1]
    w["fc.weight"] = (rng.standard_normal((CLASSES, c)) * math.sqrt(1.0 / c)).astype(np.float32)
    w["fc.bias"] = rng.uniform(-0.05, 0.05, CLASSES).astype(np.float32)
    return w


def read_safetensors(path):
    """Minimal reader (F32 only), so that no `safetensors` package is needed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"]).copy()
    return out


def write_safetensors(weights, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, path)


def onnx_model(depth, weights, opset=17):
    """The same network as an ONNX graph built with onnx.helper; dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in weights.items()]

    def conv(x, prefix, k, stride, pad):
        y = prefix + ".out"
        nodes.append(helper.make_node(
            "Conv", [x, prefix + ".weight", prefix + ".bias"], [y], name=prefix,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return y

    def op(kind, x, y, **attrs):
        nodes.append(helper.make_node(kind, [x], [y], name=y, **attrs))
        return y

    x = conv("input", "features.conv", 7, 2, 3)
    x = op("MaxPool", x, "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for g, n in enumerate(BLOCKS[depth]):
        for b in range(n):
            p = f"features.group{g}.block{b}"
            x = op("Relu", x, p + ".relu")
            x = conv(x, p + ".conv", 3, 1, 1)
        if g < 3:
            x = op("MaxPool", x, f"group{g}.pool", kernel_shape=[2, 2], strides=[2, 2])
    x = op("Relu", x, "head.relu")
    x = op("GlobalAveragePool", x, "head.gap")
    x = op("Flatten", x, "head.flatten", axis=1)
    nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))

    graph = helper.make_graph(
        nodes, f"diracnet{depth}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="diracnet-bench")
    model.ir_version = 8  # loadable by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- NumPy reference (f64)

def _conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    co, _, k, _ = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    # win: [n, c, oh, ow, k, k] -> [n, oh, ow, c*k*k]
    oh, ow = win.shape[2], win.shape[3]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n, oh, ow, c * k * k)
    y = cols @ w.reshape(co, -1).T + b
    return y.transpose(0, 3, 1, 2)


def _maxpool(x, k, stride, pad):
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5))


def reference_logits(depth, weights, x):
    """Float64 NumPy forward; x: [N, 3, 224, 224]."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = _conv(x.astype(np.float64), w["features.conv.weight"], w["features.conv.bias"], 2, 3)
    x = _maxpool(x, 3, 2, 1)
    for g, n in enumerate(BLOCKS[depth]):
        for b in range(n):
            p = f"features.group{g}.block{b}.conv"
            x = _conv(np.maximum(x, 0), w[p + ".weight"], w[p + ".bias"], 1, 1)
        if g < 3:
            x = _maxpool(x, 2, 2, 0)
    x = np.maximum(x, 0).mean(axis=(2, 3))
    return x @ w["fc.weight"].T + w["fc.bias"]
