"""Vision-language models: images in [inputs], the four families' tiny models through
`probescope run`, checked against output_hidden_states, forward hooks and the processor's
own image-token positions on separate, unwrapped copies of the same models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xarray as xr

import probescope
from probescope.probes.token_similarity import prompt_matrix
import vlm_models
from probescope import cli
from probescope.inputs import TOKEN_KINDS

PROMPTS = ["Provide a one-sentence caption for the image:", "The cat sat on the mat."]
#: Where each family's prompt puts its image when written by hand (the test's own table).
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


@pytest.fixture(scope="module")
def vlms():
    return {name: build() for name, build in vlm_models.BUILDERS.items()}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two image files of different shapes, and the folder holding them."""
    folder = tmp_path_factory.mktemp("pictures")
    vlm_models.picture(40, 24, seed=1).save(folder / "tall.png")
    vlm_models.picture(20, 36, seed=2).save(folder / "wide.jpg", quality=95)
    return folder


def images_for(name):
    """Image per prompt: PaliGemma's processor needs one with every prompt; the others
    get a text-only second prompt in the same batch."""
    return ["pictures/tall.png", "pictures/wide.jpg" if name == "paligemma" else ""]


def toml_config(name, images, *, layers='["embed", 0, 1, 2]', extra=""):
    quoted = ", ".join(f'"{x}"' for x in images)
    prompts = ", ".join(f'"{p}"' for p in PROMPTS)
    return f"""
[[models]]
name = "{name}"
path = "models/{name}"

[inputs]
prompts = [{prompts}]
images = [{quoted}]
batch_size = 2
{extra}
[[probes]]
use = "token_similarity"
layers = {layers}

[[probes]]
use = "component_norm"

[output]
dir = "out"
"""


@pytest.fixture(scope="module")
def runs(vlms, pictures, tmp_path_factory):
    """Every family saved as a model folder and run through `probescope run` with images."""
    out = {}
    for name, vlm in vlms.items():
        root = tmp_path_factory.mktemp(name)
        vlm.save(root / "models" / name)
        (root / "pictures").symlink_to(pictures)
        config = root / "probes.toml"
        config.write_text(toml_config(name, images_for(name)))
        assert cli.main(["run", str(config)]) == 0
        out[name] = {probe: xr.open_dataset(root / "out" / name / f"{probe}.nc").load()
                     for probe in ("token_similarity", "component_norm")}
    return out


def encode(vlm, name, prompt, image):
    """The processor's tensors for one prompt, unpadded, written out by hand."""
    from PIL import Image

    if image is None:
        return vlm.processor(text=[prompt], return_tensors="pt")
    pixels = Image.open(image).convert("RGB")
    text = PLACEHOLDER.get(name, "<image>") + prompt
    return vlm.processor(text=[text], images=[[pixels]], return_tensors="pt")


def reference_states(model, encoded):
    """Embedding output and every block's output, from output_hidden_states (the last
    entry has the final norm applied, so the last block is read with a forward hook)."""
    captured = {}
    blocks = model.get_decoder().layers
    handle = blocks[-1].register_forward_hook(lambda m, a, out: captured.setdefault("last", out))
    inputs = {k: v for k, v in encoded.items() if k != "labels"}
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    last = captured["last"][0] if isinstance(captured["last"], tuple) else captured["last"]
    return [h[0] for h in out.hidden_states[:-1]] + [last[0]]


def reference_similarity(h, prefix=0):
    """Cosine of every pair j <= i, and of j > i inside a bidirectional prefix."""
    h = h.double()
    n = h.shape[0]
    unit = torch.nn.functional.normalize(h, dim=-1)
    sims = (unit @ unit.T).numpy()
    keep = np.tril(np.ones((n, n), dtype=bool))
    keep[:prefix, :prefix] = True
    return np.where(keep, sims, np.nan)


@pytest.mark.parametrize("name", list(vlm_models.BUILDERS))
def test_similarity_at_every_layer_matches_output_hidden_states(name, vlms, runs, pictures):
    vlm, ds = vlms[name], runs[name]["token_similarity"]
    bare = copy.deepcopy(vlm.model)  # the run loaded its own copy from the folder
    assert list(ds.layer.values) == [-1, 0, 1, 2]
    for p, (prompt, image) in enumerate(zip(PROMPTS, images_for(name))):
        encoded = encode(vlm, name, prompt, pictures / image.split("/")[-1] if image else None)
        ids = encoded["input_ids"][0]
        n = len(ids)
        assert int(ds.n_tokens[p]) == n
        np.testing.assert_array_equal(ds.token_id[p, :n].values, ids.numpy())
        prefix = n if name == "paligemma" else 0  # image, BOS, prompt and newline: all prefix
        states = reference_states(bare, encoded)
        for li, layer in enumerate(ds.layer.values):
            expected = reference_similarity(states[layer + 1], prefix)
            got = prompt_matrix(ds, p).isel(layer=li).values
            np.testing.assert_allclose(got, expected, atol=2e-5, equal_nan=True)
        # the pairs stored are exactly those kept: j <= i, and j > i within the prefix
        assert int(ds.n_pairs[p]) == int(np.isfinite(expected).sum())
    if name == "paligemma":
        assert ds.attrs["attention"] == "bidirectional prefix"
        assert list(ds.n_prefix_tokens.values) == list(ds.n_tokens.values)
        upper = prompt_matrix(ds, 0).isel(layer=0).values[0, 1]
        assert np.isfinite(upper)  # the j > i half is kept
    else:
        assert ds.attrs["attention"] == "causal" and "n_prefix_tokens" not in ds.coords


def test_by_distance_of_a_bidirectional_prefix_counts_negative_distances(vlms, pictures, monkeypatch):
    """PaliGemma's whole prompt is one bidirectional prefix, so pairs j > i count at
    negative distances i - j. Batches of one, in the prompts' order (lengths up, then
    down), fold into one total per layer (negative distances in their own row of it),
    equal to the plain pairwise means of output_hidden_states, prompt by prompt."""
    from probescope import runner as runner_mod
    from probescope.probes.token_similarity import TokenSimilarity

    vlm = vlms["paligemma"]
    bare = copy.deepcopy(vlm.model)
    prompts = ["The cat sat on the mat.", PROMPTS[0], "a"]
    images = [pictures / "tall.png", pictures / "wide.jpg", pictures / "tall.png"]
    monkeypatch.setattr(runner_mod, "_any_prompt_order", lambda tasks, info: False)
    seen = {}
    build = TokenSimilarity.build
    monkeypatch.setattr(TokenSimilarity, "build",
                        lambda self, params, run: seen.update(run.reductions) or build(self, params, run))
    config = {"inputs": {"prompts": prompts, "images": [str(i) for i in images], "batch_size": 1},
              "probes": [{"use": "token_similarity", "layers": ["embed", 1], "form": "by_distance"}]}
    ds = probescope.run(config, models={"m": (copy.deepcopy(vlm.model), vlm.processor)},
                        write=False)["m"]["token_similarity"]
    pooled = {layer: {} for layer in (-1, 1)}
    lengths = []
    for prompt, image in zip(prompts, images):
        encoded = encode(vlm, "paligemma", prompt, image)
        n = encoded["input_ids"].shape[1]
        lengths.append(n)
        states = reference_states(bare, encoded)
        for layer in pooled:
            sims = reference_similarity(states[layer + 1], prefix=n)  # every pair, both ways
            for i in range(n):
                for j in range(n):
                    pooled[layer].setdefault(i - j, []).append(sims[i, j])
    assert lengths[0] < lengths[1] > lengths[2]
    assert all(len(parts) == 1 and tuple(parts[0].shape) == (3, 2, max(lengths)) for parts in seen.values())
    assert all(parts[0][:, 1].any() for parts in seen.values())  # the row of negative distances
    distances = sorted(pooled[-1])
    assert distances == list(range(1 - max(lengths), max(lengths)))
    assert list(ds.distance.values) == distances
    assert list(ds.n_pairs.values) == [len(pooled[-1][d]) for d in distances]
    assert list(ds.n_pairs.values) == [sum(max(n - abs(d), 0) for n in lengths) for d in distances]
    for li, layer in enumerate(pooled):
        np.testing.assert_allclose(ds.similarity.isel(layer=li).values,
                                   [np.mean(pooled[layer][d]) for d in distances], atol=2e-5)
        np.testing.assert_allclose(ds.similarity_std.isel(layer=li).values,
                                   [np.std(pooled[layer][d]) for d in distances], atol=1e-4)
    assert ds.attrs["attention"] == "bidirectional prefix"


@pytest.mark.parametrize("name", list(vlm_models.BUILDERS))
def test_token_kind_matches_the_processors_image_positions(name, vlms, runs, pictures):
    vlm, ds = vlms[name], runs[name]["token_similarity"]
    processor = vlm.processor
    assert ds.token_kind.attrs["flag_meanings"].split() == list(TOKEN_KINDS)
    kinds = np.array(TOKEN_KINDS + ("",))[ds.token_kind.values]  # -1 (padding) -> ""
    for p, (prompt, image) in enumerate(zip(PROMPTS, images_for(name))):
        path = pictures / image.split("/")[-1] if image else None
        encoded = encode(vlm, name, prompt, path)
        ids = encoded["input_ids"][0]
        n = len(ids)
        image_positions = (ids == processor.image_token_id).numpy()
        np.testing.assert_array_equal(kinds[p, :n] == "image", image_positions)
        assert int(ds.n_image_tokens[p]) == image_positions.sum()
        assert (kinds[p, n:] == "").all()
        if "mm_token_type_ids" in encoded:  # the processor's own image mask (Qwen2-VL)
            np.testing.assert_array_equal(kinds[p, :n] == "image", encoded["mm_token_type_ids"][0].numpy() == 1)
        specials = {t for t, k in zip(ds.token_text[p, :n].values, kinds[p, :n]) if k == "special"}
        if name == "idefics3" and image:
            assert {"<fake_token_around_image>", "<global-img>", "<row_1_col_1>"} <= specials
        if name == "qwen2_vl" and image:
            assert {"<|vision_start|>", "<|vision_end|>"} <= specials
    expected_images = {"llava": 16, "idefics3": 5 * 4, "paligemma": 16, "qwen2_vl": 5 * 3}
    assert int(ds.n_image_tokens[0]) == expected_images[name]


def test_thumbnail_is_kept_small_in_uint8(runs, pictures):
    from PIL import Image

    ds = runs["paligemma"]["token_similarity"]  # two images of different shapes
    assert ds.thumbnail.dtype == np.uint8
    assert ds.thumbnail.dims == ("prompt", "pixel_row", "pixel_column", "channel")
    assert list(ds.image_file.values) == images_for("paligemma")
    for p, image in enumerate(images_for("paligemma")):
        expected = Image.open(pictures / image.split("/")[-1]).convert("RGB")
        expected.thumbnail((128, 128))
        expected = np.asarray(expected)
        h, w = int(ds.thumbnail_height[p]), int(ds.thumbnail_width[p])
        assert (h, w) == expected.shape[:2] and max(h, w) <= 128
        np.testing.assert_array_equal(ds.thumbnail[p, :h, :w].values, expected)
        assert not ds.thumbnail[p, h:, :].values.any() and not ds.thumbnail[p, :, w:].values.any()
    text_only = runs["llava"]["token_similarity"]
    assert list(text_only.thumbnail_height.values) == [40, 0] and list(text_only.n_image_tokens.values) == [16, 0]


@pytest.mark.parametrize("name", ["llava", "idefics3", "paligemma", "qwen2_vl"])
def test_vision_datasets_fit_the_token_similarity_schema(runs, name):
    from probescope.probes.token_similarity import SCHEMA

    assert SCHEMA.problems(runs[name]["token_similarity"], strict=True) == []


def test_big_images_get_a_thumbnail_of_at_most_128_pixels(tmp_path):
    from probescope.inputs import read_images

    vlm_models.picture(300, 200).save(tmp_path / "big.png")
    [image], problems = read_images(["big.png"], tmp_path)
    assert not problems
    assert image.thumbnail().shape == (128, 85, 3) and image.thumbnail().dtype == np.uint8


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_activation_norm_matches_forward_hooks(name, vlms, runs, pictures):
    vlm, ds = vlms[name], runs[name]["component_norm"]
    decoder = vlm.model.get_decoder()
    parts = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj"}
    sums, count, handles = {}, 0, []
    for layer in range(3):
        for component, path in parts.items():
            def hook(module, args, output, key=(layer, component)):
                sums[key] = sums.get(key, 0.0) + output.norm(dim=-1).sum().item()
            handles.append(decoder.layers[layer].get_submodule(path).register_forward_hook(hook))
    try:
        for prompt, image in zip(PROMPTS, images_for(name)):
            encoded = encode(vlm, name, prompt, pictures / image.split("/")[-1] if image else None)
            with torch.no_grad():
                vlm.model(**encoded)
            count += encoded["input_ids"].shape[1]
    finally:
        for handle in handles:
            handle.remove()
    for (layer, component), total in sums.items():
        assert ds.value.sel(layer=layer, component=component).item() == pytest.approx(total / count, rel=1e-5)


def test_chat_template_is_applied_when_asked(vlms, pictures, tmp_path):
    vlm = vlms["llava"]
    from PIL import Image

    config = {"inputs": {"prompts": PROMPTS[:1], "images": [str(pictures / "tall.png")], "chat_template": True},
              "probes": [{"use": "token_similarity", "layers": [0]}]}
    ds = probescope.run(config, models={"m": (copy.deepcopy(vlm.model), vlm.processor)}, write=False)["m"]["token_similarity"]
    text = "User:<image> " + PROMPTS[0] + "\nAssistant:"  # CHAT_TEMPLATE written out
    expected = vlm.processor(text=[text], images=[[Image.open(pictures / "tall.png").convert("RGB")]],
                             return_tensors="pt")["input_ids"][0]
    n = len(expected)
    np.testing.assert_array_equal(ds.token_id[0, :n].values, expected.numpy())
    assert int(ds.n_tokens[0]) == n


def test_chat_template_missing_is_a_config_error(vlms, pictures):
    vlm = vlms["paligemma"]  # its processor has no chat template
    config = {"inputs": {"prompts": PROMPTS[:1], "images": [str(pictures / "tall.png")], "chat_template": True},
              "probes": [{"use": "token_similarity"}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={"m": (vlm.model, vlm.processor)}, write=False)
    [problem] = info.value.problems
    assert problem.location == "inputs.prompts[0]" and "no chat template" in problem.message


def test_image_tokens_count_against_the_position_limit(pictures):
    vlm = vlm_models.llava()
    vlm.model.config.text_config.max_position_embeddings = 20
    config = {"inputs": {"prompts": ["a b c d e", "a b c d e"], "images": [str(pictures / "tall.png"), ""]},
              "probes": [{"use": "token_similarity"}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={"m": (vlm.model, vlm.processor)}, write=False)
    [problem] = info.value.problems  # the text-only prompt fits; the one with 16 image tokens does not
    assert problem.location == "inputs.prompts[0]"
    assert "(16 of them for its image)" in problem.message and "at most 20" in problem.message


def test_bad_image_files_are_config_errors_before_any_model_loads(tmp_path, model_dirs, monkeypatch):
    from probescope import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_weights", no_loading)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    vlm_models.picture().save(tmp_path / "fine.png")
    (tmp_path / "probes.toml").write_text(f"""
[[models]]
name = "m"
path = "{model_dirs['llama']}"

[inputs]
prompts = ["a", "b", "c", "d", "e"]
images = ["missing.png", "notes.png", "folder.png", "fine.png", ""]

[[probes]]
use = "token_similarity"
layers = [7]
""")
    assert cli.main(["run", str(tmp_path / "probes.toml")]) == 2
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(tmp_path / "probes.toml", write=False)
    found = {p.location: p.message for p in info.value.problems}
    # every mistake at once: three bad files, images for a text-only model, a layer it lacks
    assert set(found) == {"inputs.images[0]", "inputs.images[1]", "inputs.images[2]", "inputs.images",
                          "probes[0].layers[0]"}
    assert "no image file at" in found["inputs.images[0]"] and "missing.png" in found["inputs.images[0]"]
    assert "not an image file" in found["inputs.images[1]"]
    assert "is a folder" in found["inputs.images[2]"]
    assert not (tmp_path / "results").exists()


def test_images_must_pair_with_prompts(tmp_path):
    config = {"inputs": {"prompts": ["a", "b"], "images": ["x.png"]}, "probes": [{"use": "token_similarity"}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={}, write=False)
    assert any(p.location == "inputs" and "images has 1 entries for 2 prompts" in p.message
               for p in info.value.problems)


def test_a_text_only_model_takes_no_images(gpt2, tokenizer, pictures):
    config = {"inputs": {"prompts": ["a b", "c d"], "images": [str(pictures / "tall.png"), ""]},
              "probes": [{"use": "token_similarity"}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)
    [problem] = info.value.problems
    assert problem.location == "inputs.images" and "text-only model" in problem.message


def test_text_only_model_datasets_label_token_kinds(gpt2, tokenizer):
    config = {"inputs": {"prompts": ["<|endoftext|>a b"]}, "probes": [{"use": "token_similarity", "layers": [0]}]}
    ds = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    n = int(ds.n_tokens[0])
    assert ds.token_kind[0, 0].item() == TOKEN_KINDS.index("special")
    assert (ds.token_kind[0, 1:n].values == TOKEN_KINDS.index("text")).all()
    assert int(ds.n_image_tokens[0]) == 0 and "thumbnail" not in ds


def test_plain_forward_of_a_llava_model_after_a_run_gives_the_same_output(pictures):
    from PIL import Image

    vlm = vlm_models.llava(seed=4)
    encoded = vlm.processor(text=["<image>a b"], images=[[Image.open(pictures / "tall.png").convert("RGB")]],
                            return_tensors="pt")
    with torch.no_grad():
        expected = copy.deepcopy(vlm.model)(**encoded).logits
    config = {"inputs": {"prompts": ["a b"], "images": [str(pictures / "tall.png")]},
              "probes": [{"use": "token_similarity"}]}
    probescope.run(config, models={"m": (vlm.model, vlm.processor)}, write=False)
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(**encoded).logits, expected)


def test_a_vision_language_model_needs_its_processor(vlms):
    vlm = vlms["llava"]
    config = {"inputs": {"prompts": ["a"]}, "probes": [{"use": "token_similarity"}]}
    with pytest.raises(probescope.ProbescopeError, match="pass its processor"):
        probescope.run(config, models={"m": (vlm.model, vlm.processor.tokenizer)}, write=False)


def _tick_texts(ax):
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


def test_similarity_grid_draws_the_image_and_one_label_per_span(runs):
    from probescope.renderers.similarity_grid import SimilarityGridRenderer

    datasets = [runs["llava"]["token_similarity"], runs["idefics3"]["token_similarity"]]
    figure = SimilarityGridRenderer().render(datasets, {"prompt": 0, "layers": [0, 2], "max_token_labels": 80})
    images = [a for a in figure.findobj(lambda o: type(o).__name__ == "AxesImage")]
    thumb = datasets[0].thumbnail[0, :40, :24].values
    assert any(np.array_equal(np.asarray(i.get_array()), thumb) for i in images)  # the picture, beside the grid
    panels = [ax for ax in figure.axes if ax.get_title() or ax.get_ylabel()]
    llava_x, llava_y = _tick_texts(figure.axes[0])
    assert llava_x.count("image") == 1 and llava_y.count("image") == 1  # one label for 16 image tokens
    idefics_axes = [ax for ax in figure.axes if ax.get_ylabel() == "idefics3"]
    x, _ = _tick_texts(idefics_axes[0])
    assert [t for t in x if t.startswith("tile")] == [f"tile {k}" for k in range(1, 6)]  # 4 tiles + global
    assert len(panels) >= 4
    assert any("16 image tokens" in t.get_text() or "llava 16" in t.get_text() for t in figure.findobj(
        lambda o: type(o).__name__ == "Text"))


def test_similarity_grid_without_token_labels_still_marks_spans(runs):
    from probescope.renderers.similarity_grid import SimilarityGridRenderer

    ds = runs["qwen2_vl"]["token_similarity"]
    figure = SimilarityGridRenderer().render([ds], {"prompt": 0, "layers": [1], "max_token_labels": 5})
    x, y = _tick_texts(figure.axes[0])
    assert x.count("image") == 1 and y.count("image") == 1
    assert all(t == "image" or t.isdigit() for t in x)


@pytest.mark.slow
def test_the_traffic_light_example_draws_its_figure(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "examples" / "vision_language.py"
    spec = importlib.util.spec_from_file_location("vision_language_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tmp_path).is_file()


@pytest.mark.parametrize("name", list(vlm_models.BUILDERS))
def test_weights_only_probes_stream_a_vision_language_folder(name, vlms, tmp_path, monkeypatch):
    """A run whose probes read only weights streams a vision-language folder's text
    decoder from its safetensors shards (the model is never built) and gives the
    decoder's raw weights' norms."""
    from probescope import models as models_mod
    from probescope.architectures.streamed import StreamedModel

    def no_load(*args, **kwargs):
        raise AssertionError("a weights-only run must not load the model")

    streamed = []
    of = StreamedModel.of
    monkeypatch.setattr(models_mod, "load_weights", no_load)
    monkeypatch.setattr(StreamedModel, "of", classmethod(lambda cls, *a: streamed.append(of(*a)) or streamed[-1]))
    vlm = vlms[name]
    vlm.model.save_pretrained(tmp_path / "models" / name, max_shard_size="20KB")
    vlm.processor.save_pretrained(tmp_path / "models" / name)
    (tmp_path / "probes.toml").write_text(f"""
[[models]]
name = "{name}"
path = "models/{name}"

[[probes]]
use = "component_norm"
statistic = "weight_norm"

[output]
dir = "out"
""")
    assert cli.main(["run", str(tmp_path / "probes.toml")]) == 0
    [model] = streamed
    assert all(p.device.type == "meta" for p in model.layout.model.parameters())
    ds = xr.open_dataset(tmp_path / "out" / name / "component_norm.nc").load()
    assert ds.attrs["dtype"] == "float32"
    layers = vlm.model.get_decoder().layers
    parts = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj"}
    assert sorted(ds.component.values) == sorted(parts)
    for layer in range(len(layers)):
        for component, path in parts.items():
            weight = layers[layer].get_submodule(path).weight.detach().double()
            assert ds.value.sel(layer=layer, component=component).item() == pytest.approx(
                torch.linalg.matrix_norm(weight).item(), rel=1e-6)
