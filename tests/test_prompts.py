"""Prompted models: fit with captions, guided generation from prompts, save
and load, export, the command line and KerasHub's CLIP encoder; run once
per KERAS_BACKEND."""

import contextlib
import io
import json
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import BACKEND
from conftest import DATA_DIR
from conftest import EAGER
from conftest import ROOT
from conftest import once
from conftest import plumbing_optimizer
from conftest import squares
from keras_diffusion import pipeline
from keras_diffusion import samplers
from keras_diffusion.images import read_images
from keras_diffusion.text import END
from keras_diffusion.text import START

TOP, BOTTOM = "a square at the top", "a square at the bottom"


def prompted_model(images=None, captions=None, train_text_encoder=True, prompt_dropout=0.1,
                   ema_decay=0.9, dim=16):
    """A one-level prompted model over a tokenizer of `captions`."""
    tokenizer = kd.WordTokenizer.from_texts(captions or [TOP, BOTTOM, "a square"], max_length=8)
    encoder = kd.TextEncoder(tokenizer, dim=dim, depth=1, heads=2)
    network = kd.UNet((8, 8, 1), widths=(8,), blocks_per_level=1, attention_levels=(0,), groups=4,
                      context_dim=16)
    model = kd.DiffusionModel(network, kd.DiffusionSchedule("cosine", timesteps=100),
                              text_encoder=encoder, train_text_encoder=train_text_encoder,
                              prompt_dropout=prompt_dropout, ema_decay=ema_decay, seed=0)
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    return model


def captioned_squares():
    """Squares in the top or bottom half of 8x8 images, captioned so."""
    images = squares(32)
    top = images[:, :4].sum(axis=(1, 2, 3)) >= images[:, 4:].sum(axis=(1, 2, 3))
    return images, [TOP if t else BOTTOM for t in top]


@pytest.fixture(scope="module")
def trained():
    """A prompted model fitted for two epochs on captioned squares, two
    captions per image (one drawn per step), with the text encoder's
    weights before training."""
    images, captions = captioned_squares()
    model = prompted_model()
    before = [ops.convert_to_numpy(v).copy() for v in model.text_encoder.trainable_variables]
    history = model.fit(images, [[caption, "a square"] for caption in captions], batch_size=16,
                        epochs=2, verbose=0)
    return model, before, history


# --------------------------------------------------------------- training
def test_fit_with_captions_trains_the_network_and_text_encoder(trained):
    model, before, history = trained
    assert model.prompted and not model.conditional
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    after = [ops.convert_to_numpy(v) for v in model.text_encoder.trainable_variables]
    assert any(not np.allclose(a, b) for a, b in zip(after, before))  # trained jointly
    # The EMA follows the text encoder too: sampling reads its averaged weights.
    assert len(model.ema_weights) == (len(model.network.trainable_variables)
                                      + len(model.text_encoder.trainable_variables))
    assert [tuple(v.shape) for v in model.text_sampling_weights] == [
        tuple(v.shape) for v in model.text_encoder.trainable_variables]


def test_captions_are_tokenised_one_or_several_per_image(trained):
    model = trained[0]
    ids = model.tokenize_captions([TOP, BOTTOM])
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, model.tokenizer([TOP, BOTTOM]))
    several = model.tokenize_captions([[TOP, "a square"], [BOTTOM]])
    assert several.shape == (2, 2, 8)  # the shorter list is cycled
    np.testing.assert_array_equal(several[1, 0], several[1, 1])
    np.testing.assert_array_equal(several[0, 1], model.tokenizer(["a square"])[0])
    np.testing.assert_array_equal(model.tokenize_captions(ids), ids)  # ids pass through


def test_several_captions_per_image_are_drawn_from_in_training(trained):
    model = trained[0]  # trained on two captions per image
    ids = model.tokenize_captions([[caption, "a square"] for caption in captioned_squares()[1]])
    ids = np.concatenate([ids, ids])
    # Each row of the drawn ids is one of the image's two captions.
    drawn = ops.convert_to_numpy(model.encode_prompts(ids[:64], training=False))
    first = ops.convert_to_numpy(model.encode_prompts(ids[:64, 0], training=False))
    second = ops.convert_to_numpy(model.encode_prompts(ids[:64, 1], training=False))
    is_first = np.all(np.isclose(drawn, first, atol=1e-5), axis=(1, 2))
    is_second = np.all(np.isclose(drawn, second, atol=1e-5), axis=(1, 2))
    assert np.all(is_first | is_second) and is_first.any() and is_second.any()


def test_prompt_dropout_replaces_captions_by_the_empty_prompt():
    model = prompted_model(prompt_dropout=0.5)
    ids = np.repeat(model.tokenizer([TOP]), 400, axis=0)
    empty = ops.convert_to_numpy(model.encode_prompts(model.tokenizer([""]), training=False))[0]
    dropped = np.all(np.isclose(ops.convert_to_numpy(model.encode_prompts(ids, training=True)),
                                empty, atol=1e-5), axis=(1, 2))
    assert 0.42 < dropped.mean() < 0.58  # 400 draws of p = 0.5: std 0.025
    kept = ops.convert_to_numpy(model.encode_prompts(ids, training=False))
    assert not np.any(np.all(np.isclose(kept, empty, atol=1e-5), axis=(1, 2)))
    np.testing.assert_array_equal(model.empty_prompt_ids, [START, END] + [0] * 6)


# ------------------------------------------------------------- sampling
def test_guidance_combines_the_prompt_and_the_negative_prompt(trained):
    model = trained[0]
    x = keras.random.normal((2, 8, 8, 1), seed=1)
    t = ops.convert_to_tensor(np.array([30, 70], "int32"))
    weights, state = pipeline.sampling_state(model)

    def output(guidance, prompts=TOP, negative_prompts=None):
        condition = pipeline.check_condition(model, 2, guidance, prompts=prompts,
                                             negative_prompts=negative_prompts)
        denoiser = pipeline.denoiser(model, weights, state, condition, guidance)
        return ops.convert_to_numpy(denoiser(x, t))

    unguided, conditional = output(0.0), output(1.0)
    # uncond + w (cond - uncond), Ho & Salimans eq. 6
    np.testing.assert_allclose(output(3.0), unguided + 3.0 * (conditional - unguided), atol=2e-4)
    assert np.abs(conditional - unguided).max() > 1e-3  # the prompt matters
    np.testing.assert_allclose(unguided, output(1.0, prompts=""), atol=1e-5)  # the empty prompt
    # A negative prompt takes the empty prompt's place in the unconditional branch.
    np.testing.assert_allclose(output(0.0, prompts=TOP, negative_prompts=BOTTOM),
                               output(1.0, prompts=BOTTOM), atol=1e-5)


def test_generate_from_prompts(trained):
    model = trained[0]
    options = dict(steps=3, sampler="ddim", seed=4, guidance_scale=2.0)
    images = model.generate(4, prompts=TOP, **options)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_allclose(images, model.generate(4, prompts=[TOP] * 4, **options), atol=1e-6)
    np.testing.assert_allclose(images, model.generate(4, prompts=TOP, negative_prompts="",
                                                      **options), atol=1e-6)
    mixed = model.generate(4, prompts=[TOP, BOTTOM, TOP, BOTTOM], **options)
    np.testing.assert_allclose(mixed[::2], images[::2], atol=1e-5)  # batched per image
    assert np.abs(mixed[1::2] - images[1::2]).max() > 0.05  # ~1 where they differ most
    batched = model.generate(4, prompts=[TOP, BOTTOM, TOP, BOTTOM], batch_size=2, **options)
    # Batches of 2 run another compiled program, whose float32 sums may come in
    # another order: on JAX 5 of 256 values moved by up to 5e-4 after three
    # guided steps with YNNPACK convolutions, 1 by 1.2e-3 with XLA's Eigen ones
    # (keras_diffusion's setting); a prompt given to the wrong image moves them
    # by up to ~1.
    np.testing.assert_allclose(batched, mixed, atol=5e-3)
    np.testing.assert_allclose(model.generate(2, steps=3, seed=4),
                               model.generate(2, steps=3, seed=4, prompts=""), atol=1e-6)


def test_restoration_and_editing_take_prompts(trained):
    model = trained[0]
    images = captioned_squares()[0][:2]
    edited = model.img2img(images, strength=0.6, steps=3, seed=0, prompts=TOP, guidance_scale=2)
    other = model.img2img(images, strength=0.6, steps=3, seed=0, prompts=BOTTOM, guidance_scale=2)
    assert edited.shape == images.shape and np.abs(edited - other).max() > 1e-4
    mask = kd.make_mask("center", images.shape)
    filled = model.inpaint(images, mask, steps=3, resamples=1, seed=0, prompts=[TOP, BOTTOM])
    known = np.broadcast_to(mask.astype(bool), images.shape)
    np.testing.assert_array_equal(filled[known], images[known])
    assert model.denoise(images, sigma=0.1, steps=2, prompts=TOP).images.shape == images.shape
    assert model.interpolate(0, 1, num=3, steps=2, prompts=BOTTOM).shape == (3, 8, 8, 1)


# ------------------------------------------------------------- save, load
def test_a_prompted_model_saves_and_loads(trained, tmp_path):
    model = trained[0]
    path = tmp_path / "prompted.keras"
    model.save(path)
    loaded = kd.load_model(path)
    assert loaded.prompted and loaded.tokenizer.vocabulary == model.tokenizer.vocabulary
    assert loaded.tokenizer.max_length == 8 and loaded.prompt_dropout == model.prompt_dropout
    options = dict(steps=3, seed=2, prompts=[TOP, BOTTOM], guidance_scale=2.0)
    np.testing.assert_allclose(loaded.generate(2, **options), model.generate(2, **options),
                               atol=1e-5)


# ---------------------------------------------------------------- errors
def test_prompted_input_errors(trained):
    model = trained[0]
    images, captions = captioned_squares()
    with pytest.raises(ValueError, match="captions are empty"):
        model.fit(images, [])
    with pytest.raises(ValueError, match="got 3 captions for 32 images"):
        model.fit(images, captions[:3])
    with pytest.raises(TypeError, match="got integers of shape \\(32,\\).*class_captions"):
        model.fit(images, np.zeros(32, "int64"))
    with pytest.raises(TypeError, match="prompts must be strings; item 1 is 7 \\(int\\)"):
        model.generate(2, prompts=["a square", 7], steps=2)
    with pytest.raises(ValueError, match="prompts must be one string or one per image \\(3\\); "
                                         "got 2"):
        model.generate(3, prompts=[TOP, BOTTOM], steps=2)
    with pytest.raises(ValueError, match="labels were given, but this model is prompted"):
        model.generate(2, labels=1, steps=2)
    with pytest.raises(ValueError, match="fit needs captions"):
        model.fit(images, epochs=1, verbose=0)
    unprompted = kd.DiffusionModel(kd.UNet((8, 8, 1), widths=(8,), attention_levels=(), groups=4))
    with pytest.raises(ValueError, match="prompts were given, but this model has no text encoder"):
        unprompted.generate(2, prompts=TOP, steps=2)


def test_a_long_prompt_is_cut_with_one_warning(trained):
    model = trained[0]
    long = "a square at the top of the square at the top"
    with pytest.warns(UserWarning, match="a text of 11 words was cut"):
        model.generate(1, prompts=long, steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a text of")  # once per tokenizer
        model.generate(1, prompts=long, steps=2)


def test_the_network_and_text_encoder_must_fit_together():
    tokenizer = kd.WordTokenizer.from_texts([TOP], max_length=8)

    def network(**kwargs):
        return kd.UNet((8, 8, 1), widths=(8,), attention_levels=(0,), groups=4, **kwargs)

    with pytest.raises(ValueError, match="context_dim=16\\), so the model needs a text encoder"):
        kd.DiffusionModel(network(context_dim=16))
    with pytest.raises(ValueError, match="a text_encoder needs a network that cross-attends"):
        kd.DiffusionModel(network(), text_encoder=kd.TextEncoder(tokenizer, dim=16, depth=1))
    with pytest.raises(ValueError, match="features of width 32 but the network's context_dim is "
                                         "16"):
        kd.DiffusionModel(network(context_dim=16),
                          text_encoder=kd.TextEncoder(tokenizer, dim=32, depth=1))
    with pytest.raises(ValueError, match="cannot take both class labels and prompts"):
        kd.DiffusionModel(network(context_dim=16, num_classes=3),
                          text_encoder=kd.TextEncoder(tokenizer, dim=16, depth=1))
    with pytest.raises(ValueError, match="prompt_dropout must be in \\[0, 1\\); got 1.0"):
        kd.DiffusionModel(network(context_dim=16), prompt_dropout=1.0,
                          text_encoder=kd.TextEncoder(tokenizer, dim=16, depth=1))


# ---------------------------------------------------------------- export
@pytest.mark.skipif(BACKEND != "tensorflow", reason="under PyTorch, export is the TensorFlow run's "
                    "code in a subprocess (test_export checks that hand-over); under JAX, the prompt "
                    "ids' endpoint is test_stable_diffusion's export test")
def test_export_serves_prompts_from_token_ids(trained, tmp_path):
    """`generate_from_tokens` gives what `generate` gives, and
    `assets/tokenizer.json` is enough to tokenise a prompt without
    keras_diffusion (the README's serving snippet)."""
    model = trained[0]
    path = tmp_path / "exported"
    model.export(path, steps=3, sampler="ddim")
    record = json.loads((path / "assets" / "tokenizer.json").read_text())
    vocabulary = {word: index for index, word in enumerate(record["vocabulary"])}

    def tokenize(text):  # as a server would, from the asset alone
        words = re.findall(record["pattern"], text.lower())[: record["max_length"] - 2]
        row = [vocabulary["<start>"]] + [vocabulary.get(w, vocabulary["<unknown>"]) for w in words]
        row.append(vocabulary["<end>"])
        return row + [vocabulary["<pad>"]] * (record["max_length"] - len(row))

    prompts = [TOP, "A square at the BOTTOM!"]
    np.testing.assert_array_equal([tokenize(p) for p in prompts], model.tokenizer(prompts))
    noise = ops.convert_to_numpy(keras.random.normal((2, 8, 8, 1), seed=5))
    ids = np.asarray([tokenize(p) for p in prompts], "int32")
    import tensorflow as tf  # serving needs TensorFlow alone, on any backend

    served = tf.saved_model.load(str(path))
    images = served.generate_from_tokens(noise, ids, tf.constant(2.0)).numpy()
    assert served.predict_noise(noise, tf.constant([5, 9]), ids).shape == (2, 8, 8, 1)
    timesteps = samplers.plan_timesteps(model.schedule, "ddim", 3)
    condition = pipeline.check_condition(model, 2, 2.0, prompts=prompts)
    expected = pipeline.decode(model, pipeline.run_sampler(
        model, noise, timesteps=timesteps, sampler="ddim", condition=condition,
        guidance_scale=2.0))
    # The text encoder's softmax and layer norms add float32 rounding where
    # the export runs in another framework, which guidance amplifies.
    np.testing.assert_allclose(images, expected, atol=1e-3)


# ----------------------------------------------------------- command line
@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory):
    """`keras-diffusion train` on configs/smoke_prompts.yaml, in-process."""
    from keras_diffusion import cli

    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST file is not at {DATA_DIR}")
    output = tmp_path_factory.mktemp("smoke_prompts")
    code, _, stderr = _cli(cli, "train", "--config", ROOT / "configs" / "smoke_prompts.yaml",
                           "--data-dir", DATA_DIR, "--output", output,
                           "--set", "data.limit=64", "--set", "training.precision=float32")
    assert code == 0, stderr[-3000:]
    return output


def _cli(cli, *args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(arg) for arg in args])
    return code, stdout.getvalue(), stderr.getvalue()


@once
def test_the_command_line_trains_samples_and_scores_prompts(prompted_run, tmp_path, monkeypatch):
    from keras_diffusion import cli
    from keras_diffusion import data

    # evaluate scores against the first 500 test images, not all 10,000: the
    # command's plumbing is under test here, not the score.
    load_dataset = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: load_dataset(
        *args, **dict(kwargs, limit=500)))
    history = (prompted_run / "history.csv").read_text().splitlines()
    assert history[0].split(",") == ["epoch", "fid", "kid", "loss", "prompt_adherence"]
    adherence = float(history[1].split(",")[-1])
    assert 0.0 <= adherence <= 1.0
    assert (prompted_run / "samples" / "epoch_0001.png").is_file()
    model = kd.load_model(prompted_run / "model.keras")
    assert model.prompted and model.tokenizer.unknown_words(["a handwritten seven"]) == []
    # The grid's rows are the held-out prompts, whose new words are unknown to it.
    assert model.tokenizer.unknown_words(["a drawing of the number seven"]) == ["drawing"]

    out = tmp_path / "prompts.png"
    code, stdout, stderr = _cli(cli, "sample", "--model", prompted_run / "model.keras",
                                "--prompt", "a handwritten seven", "--prompt", "the digit 1",
                                "--negative-prompt", "the digit 8", "--num", "4", "--steps", "2",
                                "--guidance", "2", "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == f"wrote 4 images to {out}"
    assert read_images(out).shape[0] == 1  # one grid image

    code, stdout, stderr = _cli(cli, "evaluate", "--model", prompted_run / "model.keras",
                                "--num", "10", "--steps", "2", "--guidance", "2",
                                "--data-dir", DATA_DIR)
    assert code == 0, stderr
    assert re.search(r"prompt adherence \d+\.\d\d% \(held-out templates\)", stdout)
    assert "vs 500 mnist test images" in stdout

    code, _, stderr = _cli(cli, "sample", "--model", prompted_run / "model.keras",
                           "--labels", "all", "--out", tmp_path / "x.png")
    assert code == 2
    assert stderr.strip().endswith("this one is prompted: pass --prompt (repeatable, one row each)")


# ---------------------------------------------------- KerasHub's CLIP encoder
def _bpe_vocabulary(words):
    """A CLIP byte-pair vocabulary and merges spelling out `words`."""
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocabulary.setdefault(piece, len(vocabulary))
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            vocabulary.setdefault(merged, len(vocabulary))
    return vocabulary, merges


@once
def test_keras_hub_clip_text_encoder_plugs_in():
    keras_hub = pytest.importorskip("keras_hub")
    vocabulary, merges = _bpe_vocabulary(["a", "square", "at", "the", "top", "bottom"])
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, sequence_length=8)
    encoder = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocabulary), embedding_dim=16, hidden_dim=16, num_layers=1,
        num_heads=2, intermediate_dim=32, max_sequence_length=8)
    network = kd.UNet((8, 8, 1), widths=(8,), attention_levels=(0,), groups=4, context_dim=16)
    model = kd.DiffusionModel(
        network, kd.DiffusionSchedule("cosine", timesteps=100), text_encoder=encoder,
        tokenizer=lambda texts: preprocessor({"prompts": texts, "images": None}),
        train_text_encoder=False, seed=0)
    ids = pipeline.tokenize(model, [TOP, BOTTOM])
    assert ids.shape == (2, 8) and ids[0, 0] == vocabulary["<|startoftext|>"]
    assert ids[0, 5] == vocabulary["top</w>"] and ids[1, 5] != ids[0, 5]
    np.testing.assert_array_equal(ids[0, :5], ids[1, :5])  # "a square at the"
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    images, captions = captioned_squares()
    before = [ops.convert_to_numpy(v).copy() for v in encoder.variables]
    history = model.fit(images[:8], captions[:8], batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # train_text_encoder=False: the pretrained encoder stays as it was, out of the EMA.
    for variable, old in zip(encoder.variables, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), old)
    assert len(model.ema_weights) == len(model.network.trainable_variables)
    assert model.text_sampling_weights == encoder.trainable_variables == []
    top = model.generate(2, prompts=TOP, steps=2, guidance_scale=2.0, seed=0)
    bottom = model.generate(2, prompts=BOTTOM, steps=2, guidance_scale=2.0, seed=0)
    assert top.shape == (2, 8, 8, 1) and np.abs(top - bottom).max() > 1e-5
    with pytest.raises(ValueError, match="tokenizer \\(function\\) cannot be saved"):
        model.get_config()


# ------------------------------------------------------- latent, configs
@once
def test_a_latent_model_takes_prompts(tmp_path):
    from test_latent import small_autoencoder

    from conftest import blobs

    images = blobs(32)
    autoencoder = small_autoencoder()
    autoencoder.measure_scaling_factor(images)  # untrained: the plumbing is under test
    tokenizer = kd.WordTokenizer.from_texts([TOP, BOTTOM], max_length=8)
    model = kd.LatentDiffusionModel(
        autoencoder, kd.UNet(autoencoder.latent_shape, widths=(8,), attention_levels=(0,), groups=4,
                             context_dim=16),
        kd.DiffusionSchedule("cosine", timesteps=100), seed=0,
        text_encoder=kd.TextEncoder(tokenizer, dim=16, depth=1, heads=2))
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    captions = [TOP if i % 2 else BOTTOM for i in range(32)]
    assert np.isfinite(model.fit(images, captions, batch_size=16, epochs=1, verbose=0)
                       .history["loss"][0])
    options = dict(steps=2, seed=1, prompts=[TOP, BOTTOM], guidance_scale=2.0)
    generated = model.generate(2, **options)
    assert generated.shape == (2, 16, 16, 1)
    model.save(tmp_path / "latent.keras")
    loaded = kd.load_model(tmp_path / "latent.keras")
    assert isinstance(loaded, kd.LatentDiffusionModel) and loaded.prompted
    np.testing.assert_allclose(loaded.generate(2, **options), generated, atol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["network.num_classes=10"], "text.enabled makes a prompted model, which takes captions, not "
                                 "labels: set network.num_classes to null"),
    (["text.enabled=false", "sampling.guidance_scale=1.0", "sampling.prompts=[a cat]"],
     "sampling.prompts needs a prompted model"),
    (["text.dim=10", "text.heads=4"], "text: dim must be divisible by heads; got dim=10, heads=4"),
    (["text.max_length=2"], "text: max_length must be an integer >= 3"),
    (["model.prompt_dropout=1"], "model: prompt_dropout must be in \\[0, 1\\)"),
    (["sampling.prompts=3"], "sampling.prompts must be a string, a non-empty list of strings or "
                             "null; got 3"),
])
@once
def test_the_text_section_is_checked(overrides, match):
    from keras_diffusion.config import ConfigError
    from keras_diffusion.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "smoke_prompts.yaml", overrides)


@once
def test_a_captioned_folder_is_read_with_its_metadata(tmp_path):
    from PIL import Image

    from keras_diffusion.config import load_config
    from keras_diffusion.training import load_training_data

    rows = []
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (12, 10), colour).save(tmp_path / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": f"a plain image {index}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    config = load_config(ROOT / "configs" / "smoke_prompts.yaml", [
        f"data.image_folder={tmp_path}", "data.image_size=8", "evaluation.every_n_epochs=0"])
    images, captions, shape, _ = load_training_data(config)
    assert images.shape == (3, 8, 8, 3) and shape == (8, 8, 3)
    np.testing.assert_allclose(images[1, :, :, 2], 1.0)  # blue, resized, in [0, 1]
    assert captions == ["a plain image 0", "a plain image 1", "a plain image 2"]


def test_onnx_export_of_a_prompted_model_is_refused_only_where_it_cannot_trace(trained, tmp_path):
    from keras_diffusion import backend

    model = trained[0]
    if backend.onnx_traces_layer_normalization():
        assert keras.backend.backend() in ("tensorflow", "jax")
        return
    assert keras.backend.backend() == "torch"
    with pytest.raises(ValueError, match="ONNX export of a prompted model does not work under "
                                         "PyTorch.*or export a SavedModel"):
        model.export(tmp_path / "prompted.onnx", format="onnx")
    assert not (tmp_path / "prompted.onnx").exists()
