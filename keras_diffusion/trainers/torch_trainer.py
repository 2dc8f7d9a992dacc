import functools

import torch


def train_step(model, data):
    images, labels = model.unpack_batch(data)
    model.zero_grad()
    loss = model.compute_diffusion_loss(images, labels, training=True)
    # scale_loss is the identity unless the optimizer is a LossScaleOptimizer.
    model.optimizer.scale_loss(loss).backward()
    variables = model.trainable_variables
    gradients = [v.value.grad for v in variables]
    with torch.no_grad():
        model.optimizer.apply(gradients, variables)
        model.update_ema()
    return model.update_loss_metric(loss.detach())


def test_step(model, data):
    images, labels = model.unpack_batch(data)
    loss = model.compute_diffusion_loss(images, labels, training=False)
    return model.update_loss_metric(loss)


def compile_function(fn):
    @functools.wraps(fn)
    def no_grad_fn(*args):
        with torch.no_grad():
            return fn(*args)

    return no_grad_fn
