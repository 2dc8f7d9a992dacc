import tensorflow as tf


def train_step(model, data):
    images, labels = model.unpack_batch(data)
    with tf.GradientTape() as tape:
        loss = model.compute_diffusion_loss(images, labels, training=True)
        # scale_loss is the identity unless the optimizer is a LossScaleOptimizer.
        scaled_loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_variables
    gradients = tape.gradient(scaled_loss, variables)
    model.optimizer.apply(gradients, variables)
    model.update_ema()
    return model.update_loss_metric(loss)


def test_step(model, data):
    images, labels = model.unpack_batch(data)
    loss = model.compute_diffusion_loss(images, labels, training=False)
    return model.update_loss_metric(loss)


def compile_function(fn):
    # Plain graph mode: on CPU, TF without XLA ran this UNet faster than with it.
    return tf.function(fn, reduce_retracing=True)
