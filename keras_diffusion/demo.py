"""The demo page: `keras-diffusion demo --model M`, a local web app in four tabs.

Generate (labels or class names, or a prompt; guidance, sampler, steps,
seed), inpaint (upload or pick a test image, paint what to fill in with the
brush), denoise (upload a noisy image, or add noise of a chosen sigma to a
clean one, then remove it) and img2img (a strength slider), on any backend,
for any model or preset. Built with Gradio, the optional `demo` extra.

The work is done by the plain functions below, of a model and NumPy arrays,
which the page calls and the tests call directly; each returns the picture
to show and a line saying what ran and how long it took. Bad input (an image
of the wrong size, an empty mask, a sigma out of range, an unknown label)
raises `ValueError` with one readable sentence, which the page shows as a
message, never a traceback.

>>> app = kd.demo.build_app(kd.load_model("mnist_conditional"))
>>> app.launch()                                   # http://127.0.0.1:7860
"""

import os
import time
import warnings

import numpy as np

from keras_diffusion.images import tile_images
from keras_diffusion.metrics import psnr

# Small images are shown enlarged by a whole factor, to about this many pixels.
DISPLAY_PIXELS = 256
SAMPLERS = ("dpmpp_2m", "ddim", "euler", "heun", "dpmpp_2m_sde", "ddpm")


def display_scale(model):
    """The whole factor the page enlarges the model's images by."""
    return max(1, DISPLAY_PIXELS // max(model.image_shape[:2]))


def to_display(images, scale, nrow=None):
    """`(N, H, W, C)` images in [0, 1] as one uint8 RGB grid, `nrow` to a
    row (all in one by default), each pixel repeated `scale` times both ways
    (no smoothing: digits stay crisp)."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    grid = tile_images(images, nrow or len(images))
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.round(grid * 255).astype(np.uint8)


def to_model_image(array, model, what="the image"):
    """An uploaded image (uint8 `(H, W)` or `(H, W, 1|3|4)`) as float32
    `(H, W, C)` in [0, 1] for `model`: alpha dropped, colour turned grey for
    a one-channel model (grey repeated for a colour one). An exact whole
    multiple of the model's size (as the page shows images) is averaged
    back down; any other size is refused."""
    if array is None:
        raise ValueError(f"{what} is missing: upload an image or pick one of the examples.")
    image = np.asarray(array)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be a greyscale or colour image; got an array of shape "
                         f"{image.shape}.")
    image = image.astype(np.float32) / (255.0 if image.dtype.kind in "ui" or image.max() > 1 else 1.0)
    image = image[..., :3] if image.shape[-1] == 4 else image
    height, width, channels = model.image_shape
    if channels == 1 and image.shape[-1] == 3:
        image = image @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    elif channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    factor = image.shape[0] // height
    if (factor < 1 or image.shape[0] != factor * height or image.shape[1] != factor * width):
        raise ValueError(f"{what} is {image.shape[1]}x{image.shape[0]} pixels; this model works on "
                         f"{width}x{height} images (or {width * display_scale(model)}x"
                         f"{height * display_scale(model)}, as this page shows them).")
    return image.reshape(height, factor, width, factor, channels).mean(axis=(1, 3))


def parse_labels(text, model, num):
    """`num` labels from text such as "3, 7" or "cat, dog" (cycled), or
    None for an empty text or a model without classes."""
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not names:
        return None
    if not getattr(model, "conditional", False):
        raise ValueError("this model has no classes: leave the labels empty.")
    labels = [int(name) if name.lstrip("-").isdigit() else name for name in names]
    return [labels[i % len(labels)] for i in range(num)]


def _conditioning(model, labels, prompt, num):
    if prompt and prompt.strip():
        if not getattr(model, "prompted", False):
            raise ValueError("this model takes no prompt: leave it empty"
                             + (" and give labels." if model.conditional else "."))
        return dict(prompts=[prompt.strip()] * num)
    return dict(labels=parse_labels(labels, model, num))


def _took(start, what):
    return f"{what}: {time.perf_counter() - start:.2f} s"


def _check_steps(steps):
    if int(steps) != steps or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be a whole number from 1 to 1000; got {steps}.")
    return int(steps)


# --------------------------------------------------------------- the tabs
def generate(model, *, labels="", prompt="", num=8, guidance=1.0, sampler="dpmpp_2m", steps=20,
             seed=0):
    """A grid of `num` samples, and what ran in how long."""
    if int(num) != num or not 1 <= num <= 64:
        raise ValueError(f"the number of images must be from 1 to 64; got {num}.")
    num, steps = int(num), _check_steps(steps)
    start = time.perf_counter()
    images = model.generate(num, steps=steps, sampler=sampler, seed=int(seed),
                            guidance_scale=float(guidance), **_conditioning(model, labels, prompt, num))
    return (to_display(images, display_scale(model), nrow=min(num, 8)),
            _took(start, f"{num} images, {sampler}, {steps} steps"))


def inpaint(model, editor, *, labels="", prompt="", guidance=1.0, steps=50, seed=0):
    """Fill in what was painted over on `editor` (Gradio's ImageEditor value:
    `background` and the brush `layers`); returns the image with the hole
    shown grey beside the result, and the timing line."""
    editor = editor or {}
    image = to_model_image(editor.get("background"), model)
    height, width, _ = model.image_shape
    painted = np.zeros(np.asarray(editor["background"]).shape[:2], dtype=bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4:
            painted |= layer[..., 3] > 0
        elif layer.ndim >= 2:
            painted |= (layer.reshape(layer.shape[:2] + (-1,)) > 0).any(axis=-1)
    factor = painted.shape[0] // height
    missing = painted.reshape(height, factor, width, factor).any(axis=(1, 3))
    if not missing.any():
        raise ValueError("the mask is empty: paint over the part of the image to fill in with the "
                         "brush.")
    if missing.all():
        raise ValueError("the whole image is painted over: leave some of it to keep, or use "
                         "Generate.")
    known = (~missing).astype(np.float32)[..., None]
    start = time.perf_counter()
    filled = model.inpaint(image[None], known[None], steps=_check_steps(steps), seed=int(seed),
                           guidance_scale=float(guidance), **_conditioning(model, labels, prompt, 1))
    holed = image * known + 0.5 * (1 - known)
    return (to_display(np.stack([holed, filled[0]]), display_scale(model)),
            _took(start, f"RePaint, {steps} steps"))


def denoise(model, image, *, sigma=0.2, steps=10, seed=0):
    """With `sigma` > 0, add Gaussian noise of that std (on the [0, 1]
    scale) to `image` and remove it; with 0, take `image` as noisy already
    and estimate its noise. Returns noisy | denoised (| clean) and a line
    with the PSNRs."""
    if not 0 <= sigma <= 1:
        raise ValueError(f"sigma must be in [0, 1] (0: the image is noisy already); got {sigma}.")
    clean = to_model_image(image, model)
    noisy = clean
    if sigma > 0:
        noise = np.random.default_rng(int(seed)).normal(size=clean.shape).astype(np.float32)
        noisy = clean + float(sigma) * noise
    start = time.perf_counter()
    result = model.denoise(noisy[None], sigma=float(sigma) if sigma > 0 else None,
                           steps=_check_steps(steps))
    line = _took(start, f"sigma {result.sigma:.3f}{' (estimated)' if result.sigma_estimated else ''}, "
                        f"{steps} steps")
    shown = [noisy, result.images[0]]
    if sigma > 0:
        noisy_db, denoised_db = psnr(np.stack([noisy, result.images[0]]), np.stack([clean, clean]))
        line += f"; PSNR {noisy_db:.1f} dB noisy, {denoised_db:.1f} dB denoised"
        shown.append(clean)
    return to_display(np.stack(shown), display_scale(model)), line


def img2img(model, image, *, strength=0.5, labels="", prompt="", guidance=1.0, steps=50, seed=0):
    """SDEdit: `image` noised by `strength` and sampled back; returns the
    image beside the result, and the timing line."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength}.")
    source = to_model_image(image, model)
    start = time.perf_counter()
    result = model.img2img(source[None], strength=float(strength), steps=_check_steps(steps),
                           seed=int(seed), guidance_scale=float(guidance),
                           **_conditioning(model, labels, prompt, 1))
    return (to_display(np.stack([source, result[0]]), display_scale(model)),
            _took(start, f"strength {strength}, {steps} steps"))


# ------------------------------------------------------------------ the page
def _gradio():
    # The page is local: no usage statistics sent to Gradio's servers.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise RuntimeError("the demo needs gradio: pip install 'keras-diffusion[demo]'") from None
    return gradio


def build_app(model, examples=None, title="keras_diffusion"):
    """The Gradio `Blocks` of the page for `model`; `examples` (`(N, H, W,
    C)` images in [0, 1], e.g. test images) can be picked in the inpaint,
    denoise and img2img tabs."""
    page = _Page(model, examples)
    uploads = "" if page.examples else (
        "\n\nNo test images to pick here: upload an image in the inpaint, denoise and img2img tabs.")
    with page.gr.Blocks(title=title) as app:
        page.gr.Markdown(f"## {title}\n{_describe(model)}{uploads}")
        for tab in (page.generate_tab, page.inpaint_tab, page.denoise_tab, page.img2img_tab):
            tab()
    return app


class _Page:
    """The parts every tab of the page shares: the model, how its images are
    shown, the test images to pick, and the conditioning inputs it takes."""

    def __init__(self, model, examples):
        self.gr = _gradio()
        self.model = model
        self.scale = display_scale(model)
        height, width, channels = model.image_shape
        self.shown = (width * self.scale, height * self.scale)
        self.mode = "L" if channels == 1 else "RGB"
        border = 2 * self.scale
        self.examples = [] if examples is None else [
            to_display(image[None], self.scale, nrow=1)[border:-border, border:-border]
            for image in examples]
        self.conditional, self.prompted = model.conditional, model.prompted

    # ------------------------------------------------------------ helpers
    def on_page(self, function):
        """`function` as a handler whose `ValueError` the page shows as one
        sentence, not a traceback."""
        def run(*args):
            try:
                return function(*args)
            except ValueError as error:
                raise self.gr.Error(" ".join(str(error).split()), print_exception=False) from None
        return run

    def condition_inputs(self, tab):
        """Labels, a prompt and a guidance scale, as far as the model takes them."""
        gr, inputs = self.gr, []
        if self.conditional:
            names = ", ".join(self.model.class_names or map(str, range(self.model.num_classes)))
            inputs.append(gr.Textbox(label=f"labels (comma-separated; classes: {names})",
                                     value="", elem_id=f"{tab}-labels"))
        if self.prompted:
            inputs.append(gr.Textbox(label="prompt", value="", elem_id=f"{tab}-prompt"))
        if self.model.guided:
            inputs.append(gr.Slider(0, 8, value=2.0 if tab == "generate" else 1.0, step=0.5,
                                    label="guidance scale", elem_id=f"{tab}-guidance"))
        return inputs

    def conditions(self, values):
        """The values of `condition_inputs` as keyword arguments, and the rest."""
        values, found = list(values), {}
        if self.conditional:
            found["labels"] = values.pop(0)
        if self.prompted:
            found["prompt"] = values.pop(0)
        if self.model.guided:
            found["guidance"] = values.pop(0)
        return found, values

    def action(self, tab, text, shows):
        """The tab's button, the image it shows and the line saying how long it took."""
        button = self.gr.Button(text, variant="primary", elem_id=f"{tab}-button")
        output = self.gr.Image(label=shows, elem_id=f"{tab}-output", format="png")
        return button, output, self.gr.Markdown(elem_id=f"{tab}-timing")

    def image_input(self, tab):
        image = self.gr.Image(label="image", type="numpy", image_mode=self.mode,
                              sources=("upload",), elem_id=f"{tab}-input")
        if self.examples:
            self.gr.Examples([[example] for example in self.examples], [image], label="test images")
        return image

    def seed_input(self, label="seed"):
        return self.gr.Number(0, precision=0, label=label)

    # ------------------------------------------------------------ the tabs
    def generate_tab(self):
        gr = self.gr
        with gr.Tab("Generate", id="generate"):
            condition = self.condition_inputs("generate")
            with gr.Row():
                num = gr.Slider(1, 64, value=8, step=1, label="images")
                sampler = gr.Dropdown(list(SAMPLERS), value="dpmpp_2m", label="sampler")
                steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                seed = self.seed_input()
            button, output, timing = self.action("generate", "Generate", "samples")

        def run(*values):
            found, (n, sampler_name, step_count, seed_value) = self.conditions(values)
            return generate(self.model, num=n, sampler=sampler_name, steps=step_count,
                            seed=seed_value, **found)
        button.click(self.on_page(run), [*condition, num, sampler, steps, seed], [output, timing])

    def inpaint_tab(self):
        gr = self.gr
        with gr.Tab("Inpaint", id="inpaint"):
            editor = gr.ImageEditor(
                label="paint over what to fill in", type="numpy", image_mode="RGBA",
                canvas_size=self.shown, sources=("upload",), transforms=(), layers=False,
                brush=gr.Brush(colors=["#ff3030"], default_size=max(4, 3 * self.scale),
                               color_mode="fixed"),
                elem_id="inpaint-editor")
            if self.examples:
                gr.Examples([[{"background": image, "layers": [], "composite": image}]
                             for image in self.examples], [editor], label="test images")
            condition = self.condition_inputs("inpaint")
            with gr.Row():
                steps = gr.Slider(5, 100, value=25, step=1, label="steps")
                seed = self.seed_input()
            button, output, timing = self.action("inpaint", "Inpaint", "with the hole | filled in")

        def run(value, *values):
            found, (step_count, seed_value) = self.conditions(values)
            return inpaint(self.model, value, steps=step_count, seed=seed_value, **found)
        button.click(self.on_page(run), [editor, *condition, steps, seed], [output, timing])

    def denoise_tab(self):
        gr = self.gr
        with gr.Tab("Denoise", id="denoise"):
            image = self.image_input("denoise")
            with gr.Row():
                sigma = gr.Slider(0, 1, value=0.2, step=0.01,
                                  label="add noise of sigma (0: the image is noisy already)")
                steps = gr.Slider(1, 50, value=10, step=1, label="steps")
                seed = self.seed_input("noise seed")
            button, output, timing = self.action("denoise", "Denoise", "noisy | denoised | clean")

        def run(picture, sigma_value, step_count, seed_value):
            return denoise(self.model, picture, sigma=sigma_value, steps=step_count, seed=seed_value)
        button.click(self.on_page(run), [image, sigma, steps, seed], [output, timing])

    def img2img_tab(self):
        gr = self.gr
        with gr.Tab("img2img", id="img2img"):
            image = self.image_input("img2img")
            condition = self.condition_inputs("img2img")
            with gr.Row():
                strength = gr.Slider(0.05, 1, value=0.5, step=0.05, label="strength")
                steps = gr.Slider(5, 100, value=50, step=1, label="steps")
                seed = self.seed_input()
            button, output, timing = self.action("img2img", "img2img", "image | result")

        def run(picture, *values):
            found, (strength_value, step_count, seed_value) = self.conditions(values)
            return img2img(self.model, picture, strength=strength_value, steps=step_count,
                           seed=seed_value, **found)
        button.click(self.on_page(run), [image, *condition, strength, steps, seed],
                     [output, timing])


def test_images(source, data_dir=None, count=6):
    """`count` test images of the dataset the model at `source` was trained
    on, one per class as far as there are classes, for the page's examples.

    None, with one warning saying why, when the dataset is not known (a
    model trained on an image folder) or cannot be loaded (offline, without
    `data_dir`): the page comes up without them, as its generate tab needs
    no images and the others take uploads."""
    from keras_diffusion.config import ConfigError
    from keras_diffusion.config import dataset_of_run
    from keras_diffusion.data import DatasetUnavailableError
    from keras_diffusion.data import load_dataset

    try:
        images, labels = load_dataset(dataset_of_run(source), data_dir, split="test", limit=500)
    except ConfigError:  # before ValueError, which it is
        reason = f"it is not known which built-in dataset {source} was trained on."
    except (DatasetUnavailableError, OSError, ValueError) as error:
        reason = str(error)
    else:
        firsts = [int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)[:count]]
        return images[firsts]
    warnings.warn(f"the demo page comes up without test images to pick: {reason} The generate "
                  "tab needs none; the inpaint, denoise and img2img tabs take uploads.", stacklevel=2)
    return None


def launch(model, *, examples=None, title="keras_diffusion", host="127.0.0.1", port=7860,
           block=True):
    """Serve the page for `model` on http://host:port; with `block=False`
    return the running app (its `close()` stops it)."""
    app = build_app(model, examples=examples, title=title)
    app.launch(server_name=host, server_port=port, quiet=True, prevent_thread_lock=not block,
               footer_links=[])
    return app


def _describe(model):
    height, width, channels = model.image_shape
    kind = ("prompted" if getattr(model, "prompted", False) else
            f"class-conditional ({model.num_classes} classes)" if model.conditional else
            "unconditional")
    import keras

    return (f"A {kind} diffusion model of {width}x{height}x{channels} images, "
            f"{model.network.count_params():,} parameters, on the {keras.backend.backend()} backend.")
