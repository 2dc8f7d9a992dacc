"""PyTorch: eager train and test steps, `no_grad` sampling, and channels-last
kernels for the network's group normalisation and convolutions."""

import contextlib
import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ExportArchive cannot trace PyTorch into a SavedModel; export.py then
# re-exports under TensorFlow in a subprocess.
TRACES_SAVED_MODELS = False
# A variable may be a transposed view of a checkpoint's memory: products
# take a transposed weight as they are (`F.linear` does), and convolutions
# a channels-last kernel (`weights.keras_view`).
STRIDED_VARIABLES = True



def train_step(model, data):
    batch = model.unpack_batch(data)
    model.zero_grad()
    losses = model.compute_losses(batch, training=True)
    # scale_loss is the identity unless the optimizer is a LossScaleOptimizer.
    model.optimizer.scale_loss(losses["loss"]).backward()
    variables = model.trainable_variables
    gradients = [v.value.grad for v in variables]
    with torch.no_grad():
        model.optimizer.apply(gradients, variables)
        model.after_train_step()
    return model.update_metrics({name: loss.detach() for name, loss in losses.items()})


def test_step(model, data):
    batch = model.unpack_batch(data)
    return model.update_metrics(model.compute_losses(batch, training=False))


# torch.onnx finds the shape Keras' LayerNormalization broadcasts to not constant.
ONNX_TRACES_LAYER_NORMALIZATION = False


def compile_function(fn):
    @functools.wraps(fn)
    def no_grad_fn(*args):
        with torch.no_grad():
            return fn(*args)

    return no_grad_fn


def group_normalization(layer, x):
    """One fused kernel, `group_norm` on a channels-last view of the NHWC map
    (no copy): Keras' generic version takes about ten elementwise passes and
    was 3-4x slower forward+backward on CPU, the largest cost in a train step."""
    if layer.axis not in (-1, len(x.shape) - 1) or not (layer.scale and layer.center):
        return NotImplemented
    perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
    y = F.group_norm(x.permute(perm), layer.groups, layer.gamma.value.to(x.dtype),
                     layer.beta.value.to(x.dtype), layer.epsilon)
    return y.permute((0,) + tuple(range(2, x.ndim)) + (1,))


def conv2d(layer, x):
    """`conv2d` on channels-last views of the input and kernel, which oneDNN
    runs without the two layout copies Keras' generic path makes per call.
    "same" padding is TensorFlow's (the extra row and column at the end when
    the total is odd), padded explicitly then."""
    if (layer.data_format != "channels_last" or layer.groups != 1 or max(layer.dilation_rate) != 1
            or layer.lora_enabled):  # Keras' path adds the LoRA product to the kernel
        return NotImplemented
    pads = [0, 0, 0, 0]
    if layer.padding == "same":
        for axis, (size, k, stride) in enumerate(zip(x.shape[1:3], layer.kernel_size, layer.strides)):
            total = max((-(-size // stride) - 1) * stride + k - size, 0)
            pads[2 - 2 * axis: 4 - 2 * axis] = [total // 2, total - total // 2]
    x = x.permute(0, 3, 1, 2)
    if pads[0] == pads[1] and pads[2] == pads[3]:
        padding = (pads[2], pads[0])
    else:
        x, padding = F.pad(x, pads), 0
    kernel = _torch_kernel(layer, x.dtype)
    bias = layer.bias.value.to(x.dtype) if layer.use_bias else None
    y = F.conv2d(x, kernel, bias, layer.strides, padding).permute(0, 2, 3, 1)
    return layer.activation(y) if layer.activation is not None else y


def dense(layer, x):
    """`linear` with the bias in the product (one `addmm`): Keras' generic
    path multiplies, then adds the bias in a second pass over the output
    (0.5 s of a guided SD 1.5 UNet step, `benchmarks/sd_profile.py`)."""
    if layer.lora_enabled or layer.quantization_mode:
        return NotImplemented
    bias = layer.bias.value.to(x.dtype) if layer.use_bias else None
    y = F.linear(x, layer.kernel.value.to(x.dtype).T, bias)
    return layer.activation(y) if layer.activation is not None else y


def _torch_kernel(layer, dtype):
    """The `(out, in, kh, kw)` kernel `conv2d` takes, channels-last in
    memory, which oneDNN reads without a copy. A permuted view of Keras'
    `(kh, kw, in, out)` kernel is not: copying it on every call cost 2.2 of
    a guided SD 1.5 UNet step's 8.1 s, and keeping the copy beside the
    variable 2.3 GB (`benchmarks/sd_memory.py`). So the variable's own
    storage is laid out once, in place: it keeps its shape and values, as a
    strided view of the channels-last tensor, and every later call permutes
    it for free. A variable assigned a new tensor is laid out again on its
    next call; where the variable's dtype is not the computation's (mixed
    precision) the cast copy is made per call."""
    kernel = layer.kernel.value
    oihw = kernel.permute(3, 2, 0, 1)
    if kernel.dtype != dtype:
        return oihw.to(dtype)
    if not oihw.is_contiguous(memory_format=torch.channels_last):
        kernel.data = oihw.detach().contiguous(memory_format=torch.channels_last).permute(
            2, 3, 1, 0)
        oihw = kernel.permute(3, 2, 0, 1)
    return oihw


def initial_value(array):
    """A host array as a tensor on the same memory (Keras' own conversion
    copies it first, and takes bfloat16 through float32 and back)."""
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, torch's bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def accelerator():
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability() if torch.version.cuda else "gpu"


@contextlib.contextmanager
def onnx_export_context():
    """The trace fixes Python-level checks on static shapes; that is intended."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield
