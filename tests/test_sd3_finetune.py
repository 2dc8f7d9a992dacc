"""Fine-tuning SD 3 with `fit`, against diffusers' `train_dreambooth_sd3.py`
and `train_dreambooth_lora_sd3.py`: the scripts' `--weighting_scheme`
options draw the sigmas and weigh the loss as `diffusers.training_utils`
does, from the scheduler's shifted table; the loss of one batch is the
script's for the same draws (diffusers' transformer, preconditioned outputs
or not); the whole transformer trains with gradient checkpointing on cached
latents; `save_diffusers` writes a `StableDiffusion3Pipeline` folder that
diffusers loads to our images; DreamBooth with prior preservation through
`keras-diffusion finetune`. The pipelines are `sd_pipelines`' tiny ones."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from conftest import cli_main
from conftest import once
from sd_pipelines import DREAMBOOTH_OPTIONS
from sd_pipelines import assert_only_the_network_trained
from sd_pipelines import part_values
from sd_pipelines import write_instance_images
from sd_pipelines import write_pipeline

CAPTIONS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_finetune") / "pipeline"
    return {"folder": folder, "pipeline": write_pipeline(folder, "sd3")}


@pytest.fixture(scope="module")
def model(made):
    return kd.load_model(made["folder"])


def _latents(count=1, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 8, 8, 16)).astype("float32")


def _images(count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, 16, 16, 3)).astype("float32")


def _theirs(pipeline, latents):
    import torch

    with torch.no_grad():
        return pipeline(prompt=CAPTIONS[0], negative_prompt="blurry", height=16, width=16,
                        num_inference_steps=3, guidance_scale=5.0, output_type="np",
                        latents=torch.from_numpy(np.ascontiguousarray(
                            latents.transpose(0, 3, 1, 2)))).images


def _ours(model, latents):
    return model.generate(1, prompts=CAPTIONS[0], negative_prompts="blurry", guidance_scale=5.0,
                          steps=3, sampler="euler", noise=latents)


# ------------------------------------------------------ the script's options
@once
def test_the_schedule_trains_as_the_script_by_default(model):
    schedule = model.schedule
    assert (schedule.density, schedule.weighting, schedule.precondition_outputs) == \
        ("logit_normal", "none", True)
    assert (schedule.logit_mean, schedule.logit_std) == (0.0, 1.0)


@once
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"])
def test_each_weighting_scheme_draws_and_weighs_as_diffusers(model, made, scheme):
    """u as `compute_density_for_timestep_sampling` draws it, the sigma at
    index `int(u * 1000)` of the scheduler's shifted table (and the
    network's time, its timestep there), the weights of
    `compute_loss_weighting_for_sd3`, times sigma^2 when preconditioned."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    model.configure_fine_tuning(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2,
                                mode_scale=1.1, precondition_outputs=False)
    schedule = model.schedule
    expected = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.1,
        generator=torch.Generator().manual_seed(5)).numpy()
    generator = torch.Generator().manual_seed(5)
    raw = (torch.randn(64, generator=generator) if schedule.density == "logit_normal"
           else torch.rand(64, generator=generator)).numpy()
    u = ops.convert_to_numpy(schedule.timestep_density(
        raw, schedule.density, logit_mean=0.3, logit_std=1.2, mode_scale=1.1))
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-6)
    scheduler = made["pipeline"].scheduler.__class__.from_config(made["pipeline"].scheduler.config)
    indices = (torch.from_numpy(u) * 1000).long()
    sigmas = scheduler.sigmas[indices].numpy()
    np.testing.assert_allclose(schedule.training_sigmas[indices.numpy()], sigmas, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(schedule.network_time(sigmas)),
                               scheduler.timesteps[indices].numpy(), rtol=1e-5)
    weights = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(ops.convert_to_numpy(schedule.loss_weight(sigmas)), weights,
                               rtol=1e-5)
    model.configure_fine_tuning(weighting_scheme=scheme, precondition_outputs=True)
    np.testing.assert_allclose(ops.convert_to_numpy(schedule.loss_weight(sigmas)),
                               weights * sigmas**2, rtol=1e-5)
    # Drawn in training: sigmas of the table, where the density puts them.
    drawn = ops.convert_to_numpy(schedule.draw_levels(2048, seed=0))
    assert np.isin(drawn, schedule.training_sigmas).all()
    if scheme == "logit_normal":  # the median u 0.5, shifted by 3: 0.75
        assert abs(np.median(drawn) - 0.75) < 0.03
    model.configure_fine_tuning()


def _loss(model, ids, x0):
    """Our loss of one batch, and the draws it made (the seed's state restored)."""
    state = ops.convert_to_numpy(model.seed_generator.state).copy()
    loss = float(ops.convert_to_numpy(model.compute_diffusion_loss(x0, ids, training=False)))
    model.seed_generator.state.assign(state)
    sigma = ops.convert_to_numpy(model.schedule.draw_levels(len(x0), seed=model.seed_generator))
    noise = ops.convert_to_numpy(keras.random.normal(x0.shape, seed=model.seed_generator))
    model.seed_generator.state.assign(state)
    return loss, sigma, noise


def _script_loss(pipeline, x0, sigma, noise, scheme, precondition):
    """The scripts' loss from the same latents, sigmas and noise, with
    diffusers' transformer and prompt encoding."""
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0, noise = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x0, noise))
    sigmas = torch.from_numpy(sigma)[:, None, None, None]
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(CAPTIONS, None, None,
                                                      do_classifier_free_guidance=False)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        model_pred = pipeline.transformer(hidden_states=noisy, timestep=sigmas.flatten() * 1000,
                                          encoder_hidden_states=embeds,
                                          pooled_projections=pooled, return_dict=False)[0]
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy
    target = x0 if precondition else noise - x0
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    per_example = torch.mean((weighting * (model_pred - target) ** 2).reshape(len(x0), -1), 1)
    return float(per_example.mean())


@pytest.mark.parametrize("scheme, precondition", [("logit_normal", True),
                                                  pytest.param("cosmap", False, marks=once)])
def test_the_loss_is_the_scripts_for_the_same_draws(model, made, scheme, precondition):
    model.configure_fine_tuning(weighting_scheme=scheme, precondition_outputs=precondition)
    x0 = _latents(2, seed=3)
    loss, sigma, noise = _loss(model, model.tokenize_captions(CAPTIONS), x0)
    assert np.isin(sigma, model.schedule.training_sigmas).all()
    expected = _script_loss(made["pipeline"], x0, sigma, noise, scheme, precondition)
    assert loss == pytest.approx(expected, rel=1e-4)
    model.configure_fine_tuning()


# ---------------------------------------------------------------------- fit
@once
def test_fit_fine_tunes_the_whole_transformer(made):
    model = kd.load_model(made["folder"])
    frozen = part_values(model.text_encoder) + part_values(model.autoencoder)
    transformer = part_values(model.network)
    model.configure_fine_tuning(weighting_scheme="mode", prompt_dropout=0.5)
    model.enable_gradient_checkpointing()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    latents = model.encode_latents(_images(4))
    assert latents.shape == (4, 8, 8, 16)
    history = model.fit(latents, CAPTIONS * 2, batch_size=2, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[0] != losses[1]
    assert_only_the_network_trained(model, transformer, frozen)


@once
def test_bad_training_options_are_one_line_and_change_nothing(model):
    before = model.schedule.get_config()
    cases = [(dict(weighting_scheme="logit"), "weighting_scheme must be one of logit_normal, "
                                              "mode, uniform, sigma_sqrt, cosmap; got 'logit'"),
             (dict(logit_std=0.0), "logit_std must be > 0"),
             (dict(precondition_outputs="yes"), "precondition_outputs must be True or False"),
             (dict(weighting_scheme="cosmap", prompt_dropout=1.5),
              r"prompt_dropout must be in \[0, 1\)")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            model.configure_fine_tuning(**options)
        assert "\n" not in str(error.value)
        assert model.schedule.get_config() == before and model.prompt_dropout == 0.0
    with pytest.raises(TypeError):
        model.configure_fine_tuning(noise_offset=0.1)  # the SD 3 scripts have none


# ---------------------------------------------------------- save_diffusers
@once
@pytest.mark.parametrize("style", ["sd3", "sd3_no_t5"])
def test_save_diffusers_loads_in_diffusers_to_our_images(made, tmp_path, style):
    from diffusers import StableDiffusion3Pipeline

    folder = made["folder"]
    if style == "sd3_no_t5":
        folder = tmp_path / "no_t5"
        write_pipeline(folder, style)
    ours = kd.load_model(folder)
    latents = _latents()
    image = _ours(ours, latents)
    saved = ours.save_diffusers(tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert (index["text_encoder_3"] == [None, None]) == (style == "sd3_no_t5")
    vae = json.loads((saved / "vae" / "config.json").read_text())
    assert vae["shift_factor"] == pytest.approx(0.0609)
    scheduler = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == 3.0
    # diffusers reads its own folders without T5 so too: told that the null parts are None.
    none = {"text_encoder_3": None, "tokenizer_3": None} if style == "sd3_no_t5" else {}
    np.testing.assert_allclose(
        _theirs(StableDiffusion3Pipeline.from_pretrained(saved, **none), latents), image,
        atol=2e-3)
    again = kd.load_model(saved)
    np.testing.assert_allclose(_ours(again, latents), image, atol=1e-5)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        ours.save_diffusers(saved)


# ---------------------------------------------------------------- the command
@once
def test_the_command_sets_the_scripts_training_options(made, tmp_path, capsys, monkeypatch):
    """`--weighting-scheme` and its settings, `--precondition-outputs` and
    `--train-text-encoder` reach the model as the script's flags do; SD
    1.x's `--snr-gamma` is refused in one line naming SD 3's, before
    anything is written."""
    from safetensors.numpy import load_file

    from keras_diffusion.stable_diffusion import finetuning

    data = write_instance_images(tmp_path / "instance")
    output = tmp_path / "run"
    command = ("finetune", "--model", made["folder"], "--data-dir", data, "--output", output,
               *DREAMBOOTH_OPTIONS)
    assert cli_main(*command, "--snr-gamma", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["keras-diffusion finetune: error: --snr-gamma is not a training option of "
                   "a StableDiffusion3; it takes --proportion-empty-prompts, --weighting-scheme, "
                   "--logit-mean, --logit-std, --mode-scale, --precondition-outputs"]
    assert not (output / "class_images").exists()
    trained = []
    real = finetuning.finetune
    monkeypatch.setattr(finetuning, "finetune",
                        lambda model, *args, **kwargs: trained.append(model) or real(
                            model, *args, **kwargs))
    assert cli_main(*command, "--weighting-scheme", "mode", "--mode-scale", "0.5",
                    "--precondition-outputs", "0", "--train-text-encoder") == 0
    schedule = trained[0].schedule
    assert (schedule.density, schedule.mode_scale, schedule.precondition_outputs) == \
        ("mode", 0.5, False)
    parts = {key.split(".")[0] for key in load_file(output / "pytorch_lora_weights.safetensors")}
    assert parts == {"transformer", "text_encoder", "text_encoder_2"}


@once
def test_dreambooth_with_prior_preservation_through_the_command(made, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    data = write_instance_images(tmp_path / "instance")
    output = tmp_path / "run"
    assert cli_main("finetune", "--model", made["folder"], "--data-dir", data, "--output", output,
                    *DREAMBOOTH_OPTIONS) == 0
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    assert len(list((output / "class_images").glob("*.png"))) == 2
    model = kd.load_model(made["folder"])
    latents = _latents(seed=1)
    before = _ours(model, latents)
    model.load_lora_weights(output)
    after = _ours(model, latents)
    assert np.abs(after - before).max() > 1e-4
    pipeline = StableDiffusion3Pipeline.from_pretrained(made["folder"])
    pipeline.load_lora_weights(output)
    np.testing.assert_allclose(_theirs(pipeline, latents), after, atol=2e-3)
