"""Publishing gear_hf tokenizers, generators and pipelines on the Hugging Face Hub, with model cards.

A card says what the weights are (tokenizer only, AR generator only, or the full pipeline), how they were trained
(the `training` knobs you pass) and how they are evaluated (rFID with bicubic resize; gFID with the `"fid"`
sampling preset), and gives a copy-paste usage snippet. Cards are rendered from the Jinja templates in
`model_cards/` (`tokenizer.md`, `generator.md`, `pipeline.md`).

```python
from gear_hf.hub import push_to_hub

push_to_hub(pipe, "me/gear-vq-llamagen-b", license="apache-2.0", datasets=["ILSVRC/imagenet-1k"],
            training={"stage": "2 (AR on the frozen GEAR tokenizer)", "steps": 400_000}, metrics={"gFID": 2.9})
```

`pipe.push_to_hub(...)` on a [`GEARPipeline`] routes here, as does `push_to_hub` of models that mix in
[`GEARHubMixin`]. Pulling needs nothing special: `GEARPipeline.from_pretrained`,
`GEARTokenizerModel.from_pretrained` and `GEARForCausalImageLM.from_pretrained` take a Hub id or a local directory,
and work offline (`HF_HUB_OFFLINE=1`) from a warm cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

LIBRARY_NAME = "gear_hf"
TEMPLATE_FILES = {"tokenizer": "tokenizer.md", "generator": "generator.md", "pipeline": "pipeline.md"}
# Where the templates are looked up, in order: inside the installed package (wheel: setup.py maps the repo's
# top-level `model_cards/` to `gear_hf/model_cards/`), then the source tree's top-level `model_cards/`.
_TEMPLATE_DIRS = (
    Path(__file__).resolve().parent / "model_cards",
    Path(__file__).resolve().parents[2] / "model_cards",
)
_QUANTIZER_NAMES = {"vq": "VQ (L2-normalised codebook)", "lfq": "LFQ (lookup-free)", "ibq": "IBQ (index backprop)"}
_DEFAULT_PRESETS = {  # used only if gear_hf.sampling cannot be imported
    "fid": {"guidance_scale": 1.0, "guidance_interval": None, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "demo": {"guidance_scale": 4.0, "guidance_interval": None, "temperature": 1.0, "top_k": 2000, "top_p": 1.0},
}


# ------------------------------------------------------------------------------------------------- templates
def model_card_template_path(kind: str) -> Path:
    """Path of the Jinja template for `kind` in {"tokenizer", "generator", "pipeline"}."""
    if kind not in TEMPLATE_FILES:
        raise ValueError(f"Unknown model card kind {kind!r}; choose one of {sorted(TEMPLATE_FILES)}.")
    for directory in _TEMPLATE_DIRS:
        path = directory / TEMPLATE_FILES[kind]
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in _TEMPLATE_DIRS)
    raise FileNotFoundError(
        f"Model card template {TEMPLATE_FILES[kind]!r} not found (searched {searched}). The installed gear_hf "
        "package is missing its package data; reinstall it, or pass template_path=... explicitly."
    )


# ------------------------------------------------------------------------------------------- what is this
def model_kind(obj: Any) -> str:
    """"tokenizer", "generator" or "pipeline" for a gear_hf object (judged by its components / config)."""
    if hasattr(obj, "components") and hasattr(obj, "vq_model") and hasattr(obj, "transformer"):
        return "pipeline"
    model_type = getattr(getattr(obj, "config", None), "model_type", None)
    if model_type == "gear_tokenizer":
        return "tokenizer"
    if model_type == "gear_ar":
        return "generator"
    raise TypeError(
        f"Cannot publish a {type(obj).__name__}: pass a GEARTokenizerModel, a GEARForCausalImageLM or a "
        "GEARPipeline."
    )


def _count_parameters(model: Any) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count:,}"


def _size_name(config: Any) -> str:
    from .models.configuration_gear_ar import LLAMAGEN_PRESETS

    for name, sizes in LLAMAGEN_PRESETS.items():
        if all(getattr(config, key) == value for key, value in sizes.items()):
            return name
    return (f"custom size: {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"{config.num_attention_heads} heads")


def _tokenizer_facts(model: Any) -> dict[str, Any]:
    c = model.config
    return {
        "quantizer_name": _QUANTIZER_NAMES.get(c.quantizer, c.quantizer),
        "codebook_size": c.codebook_size,
        "image_size": c.image_size,
        "grid_size": c.grid_size,
        "architecture": [
            ("quantizer", f"`{c.quantizer}` — {_QUANTIZER_NAMES.get(c.quantizer, c.quantizer)}"),
            ("codebook size K", c.codebook_size),
            ("code dimension", c.codebook_embed_dim),
            ("downsampling factor", c.downsample_factor),
            ("resolution / token grid", f"{c.image_size} px / {c.grid_size}×{c.grid_size} tokens"),
            ("encoder/decoder widths", f"{c.base_channels} × {list(c.channel_multipliers)}"),
            ("parameters", _count_parameters(model)),
        ],
    }


def _generator_facts(model: Any) -> dict[str, Any]:
    c = model.config
    text = c.is_text_conditional
    if text:
        kind = f"text-conditional LlamaGen ({_size_name(c)}), first {c.num_double_stream_layers} blocks dual-stream"
        condition = (f"text: {c.text_length} positions of caption_dim {c.caption_dim} ({c.text_attention} "
                     "attention); the unconditional condition is the encoding of \"\"")
    else:
        kind = f"class-conditional LlamaGen ({_size_name(c)})"
        condition = f"{c.num_classes}" + (" classes + null class (CFG)" if c.has_null_class else " classes (no CFG)")
    return {
        "size_name": _size_name(c),
        "text_to_image": text,
        "vocab_size": c.vocab_size,
        "num_classes": c.num_classes,
        "has_null_class": c.has_null_class,
        "caption_dim": c.caption_dim,
        "text_length": c.text_length,
        "image_size": c.image_size,
        "grid_size": c.grid_size,
        "num_image_tokens": c.num_image_tokens,
        "architecture": [
            ("architecture", kind),
            ("layers / width / heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads}"),
            ("image-token vocabulary", c.vocab_size),
            ("condition", condition),
            ("token grid", f"{c.grid_size}×{c.grid_size} ({c.num_image_tokens} tokens, {c.image_size} px)"),
            ("parameters", _count_parameters(model)),
        ],
    }


def _text_encoder_facts(pipeline: Any) -> dict[str, Any]:
    encoder = getattr(pipeline, "text_encoder", None)
    if encoder is None:
        return {}
    name = getattr(encoder.config, "_name_or_path", "") or type(encoder).__name__
    return {"text_encoder_name": name,
            "text_encoder_row": ("text_encoder", f"`{type(encoder).__name__}` ({name}), hidden size "
                                                 f"{encoder.config.hidden_size}, frozen")}


def _sampling_presets() -> dict[str, dict[str, Any]]:
    try:
        from .sampling import SAMPLING_PRESETS
    except ImportError:  # pragma: no cover - the sampler ships with the package
        return _DEFAULT_PRESETS
    keys = ("guidance_scale", "guidance_interval", "temperature", "top_k", "top_p")
    return {name: {k: getattr(cfg, k) for k in keys} for name, cfg in SAMPLING_PRESETS.items()}


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        elif value is not None:
            flat[name] = f"`{value}`" if isinstance(value, (list, tuple)) else value
    return flat


def _as_table(values: Mapping[str, Any] | Any | None) -> dict[str, Any] | None:
    if values is None:
        return None
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)
    if not isinstance(values, Mapping):
        raise TypeError(f"Expected a mapping (or dataclass) of name -> value, got {type(values).__name__}.")
    return _flatten(values) or None


def _label_facts(pipeline: Any) -> dict[str, Any]:
    id2label = getattr(pipeline, "id2label", None) or {}
    names = [id2label[k].split(",")[0].strip() for k in sorted(id2label)]
    return {"label_names": names, "example_label_name": names[0] if names else None}


# ------------------------------------------------------------------------------------------------ the card
def create_model_card(
    obj: Any,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | str | None = None,
    tags: Sequence[str] | None = None,
    base_model: str | Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    model_name: str | None = None,
    description: str | None = None,
    training: Mapping[str, Any] | Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    interpolation: str = "bicubic",
    files: Sequence[str] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Build the model card of a tokenizer, an AR generator or a pipeline.

    Args:
        obj: a `GEARTokenizerModel`, `GEARForCausalImageLM` or `GEARPipeline`.
        repo_id: Hub id used in the usage snippet (defaults to a placeholder).
        license: SPDX-style Hub license id of the *weights* (e.g. "apache-2.0", "mit", "other"); not guessed.
        datasets: Hub dataset ids the weights were trained on (e.g. "ILSVRC/imagenet-1k").
        tags: extra tags (gear_hf, gear and the kind-specific tags are always added).
        base_model: Hub id(s) the weights were fine-tuned from (e.g. the warm-up tokenizer).
        pipeline_tag: Hub task; defaults to "unconditional-image-generation" for a pipeline (the Hub task that
            class-conditional ImageNet generators use) and to none for a lone tokenizer or generator.
        model_name: card title (defaults to the repo name).
        description: free text put under the title.
        training: how the weights were trained — stage, steps, recipe knobs; a mapping or a dataclass (e.g. the
            training config), flattened into a table (nested keys joined with dots, None values dropped).
        metrics: reported numbers, e.g. {"rFID (bicubic)": 1.64, "PSNR": 20.78} or {"gFID": 2.9}.
        interpolation: resize used by the tokenizer evaluation ("bicubic", GEAR's protocol, or "bilinear").
        files: repository files to list in the card (filled in by `push_to_hub`).
        template_path: a custom Jinja template instead of the shipped one.
    """
    from .version import __version__

    kind = model_kind(obj)
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}.")
    if license is None:
        logger.warning("No license given for the model card of %s; pass license='apache-2.0' (or the weights' "
                       "license) to declare one.", repo_id or type(obj).__name__)
    repo_id = repo_id or f"<your-username>/<{kind}-repo>"
    presets = _sampling_presets()

    if kind == "tokenizer":
        facts = _tokenizer_facts(obj)
        kind_tags = ["image-tokenizer", "vector-quantization", obj.config.quantizer]
    else:
        gen = _generator_facts(obj.transformer if kind == "pipeline" else obj)
        condition = "text-to-image" if gen["text_to_image"] else "class-conditional"
        kind_tags = ["image-generation", "autoregressive", condition, "llamagen"]
        facts = gen
    if kind == "pipeline":
        tok, text = _tokenizer_facts(obj.vq_model), _text_encoder_facts(obj)
        facts = {**gen, **tok, **text, "image_size": obj.image_size}
        facts["architecture"] = [("vq_model: " + k, v) for k, v in tok["architecture"]] + [
            ("transformer: " + k, v) for k, v in gen["architecture"]] + ([text["text_encoder_row"]] if text else [])
        facts.update(_label_facts(obj))
        kind_tags += ["image-tokenizer", obj.vq_model.config.quantizer]
        if pipeline_tag is None:  # class-conditional ImageNet generators use the unconditional task on the Hub
            pipeline_tag = "text-to-image" if condition == "text-to-image" else "unconditional-image-generation"

    all_tags = [LIBRARY_NAME, "gear"] + kind_tags + list(tags or [])
    if isinstance(datasets, str):
        datasets = [datasets]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        tags=list(dict.fromkeys(all_tags)),
        pipeline_tag=pipeline_tag,
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
    )
    template = Path(template_path) if template_path is not None else model_card_template_path(kind)
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name or repo_id.split("/")[-1],
        repo_id=repo_id,
        description=description,
        gear_hf_version=__version__,
        training=_as_table(training),
        metrics=_as_table(metrics),
        interpolation=interpolation,
        files=sorted(files) if files else None,
        example_label=0,
        fid_preset="fid",
        demo_preset="demo",
        fid_settings=presets["fid"],
        demo_settings=presets["demo"],
        **facts,
    )


def write_model_card(obj: Any, save_directory: str | os.PathLike, **card_kwargs) -> Path:
    """Render the card of `obj` into `save_directory/README.md` (listing the files already there)."""
    save_directory = Path(save_directory)
    files = [p.relative_to(save_directory).as_posix() for p in save_directory.rglob("*")
             if p.is_file() and p.name != "README.md"]
    card_kwargs.setdefault("files", files)
    path = save_directory / "README.md"
    create_model_card(obj, **card_kwargs).save(path)
    return path


# ------------------------------------------------------------------------------------------------- pushing
def _save_plain(obj: Any, directory: str) -> None:
    """`save_pretrained` without any push logic (our pipeline/mixins route pushes back here)."""
    obj.save_pretrained(directory)


def upload_saved_folder(
    obj: Any,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    api: HfApi | None = None,
    token: str | bool | None = None,
    private: bool | None = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    model_card: ModelCard | str | bool | None = None,
    **card_kwargs,
):
    """Upload a folder that already holds `obj.save_pretrained(folder)` to `repo_id`, writing the model card to
    `folder/README.md` first (see `push_to_hub` for the arguments). Returns the `CommitInfo`."""
    kind = model_kind(obj)
    if model_card is not None and not isinstance(model_card, bool) and card_kwargs:
        raise ValueError(f"Pass either model_card=... or card arguments ({sorted(card_kwargs)}), not both.")
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if model_card is None or model_card is True:
        write_model_card(obj, folder, repo_id=repo_id, **card_kwargs)
    elif model_card is not False:
        card = model_card if isinstance(model_card, ModelCard) else ModelCard(str(model_card))
        card.save(os.path.join(folder, "README.md"))
    logger.info("Uploading %s (%s) to %s", type(obj).__name__, kind, repo_id)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        token=token,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload gear_hf {kind} ({type(obj).__name__})",
        commit_description=commit_description,
    )


def push_to_hub(obj: Any, repo_id: str, *, api: HfApi | None = None, private: bool | None = False,
                commit_message: str | None = None, **kwargs):
    """Save `obj` (tokenizer, generator or pipeline) to a temporary directory, add the model card as README.md
    and upload the folder to `repo_id` in one commit (`api.create_repo(exist_ok=True)` + `api.upload_folder`).
    Returns the `CommitInfo` of the upload.

    Args:
        api: the `HfApi` to use (inject a fake one in tests); defaults to `HfApi(token=token)`.
        private: visibility when the repo is created (an existing repo keeps its visibility).
        commit_message: defaults to "Upload gear_hf <kind> (<class>)".
        token, revision, create_pr, commit_description: as in `HfApi.upload_folder`.
        model_card: None (default) renders our card from the templates with the card arguments (see
            `create_model_card`: license, datasets, tags, base_model, training, metrics, ...). It **replaces** a
            README.md already on the Hub, so the card always describes the pushed weights. A `ModelCard` or a
            markdown string uploads that card instead; `False` uploads no README.md (the Hub one stays).
    """
    model_kind(obj)  # fail before saving anything
    with tempfile.TemporaryDirectory(prefix="gear_hf-push-") as tmp_dir:
        _save_plain(obj, tmp_dir)
        return upload_saved_folder(obj, tmp_dir, repo_id, api=api, private=private, commit_message=commit_message,
                                   **kwargs)


_UPLOAD_ARGS = {"repo_id", "api", "private", "commit_message", "commit_description", "revision", "create_pr",
                "model_card"}
_CARD_ARGS = {"license", "datasets", "tags", "base_model", "pipeline_tag", "model_name", "description", "training",
              "metrics", "interpolation", "template_path"}


class GEARHubMixin:
    """Mix into a gear_hf `PreTrainedModel` (first in the bases) so that `model.push_to_hub(repo_id, ...)` and
    `model.save_pretrained(dir, push_to_hub=True, repo_id=...)` upload our model card instead of transformers'
    generic one. Accepts transformers' arguments plus `api`, `model_card` and the card arguments of
    `create_model_card`.

    ```python
    class GEARTokenizerModel(GEARHubMixin, GEARTokenizerPreTrainedModel): ...
    ```
    """

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = None,
        tags: list[str] | None = None,
        api: HfApi | None = None,
        model_card: ModelCard | str | bool | None = None,
        **card_kwargs,
    ):
        if max_shard_size is not None:
            raise ValueError("max_shard_size is not supported by gear_hf's push_to_hub; save with "
                             "save_pretrained(max_shard_size=...) and upload the folder with HfApi.upload_folder.")
        if tags:
            card_kwargs["tags"] = list(card_kwargs.get("tags") or []) + list(tags)
        return push_to_hub(self, repo_id, api=api, token=token, private=private, commit_message=commit_message,
                           commit_description=commit_description, revision=revision, create_pr=create_pr,
                           model_card=model_card, **card_kwargs)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _UPLOAD_ARGS | _CARD_ARGS}
        super().save_pretrained(save_directory, *args, **kwargs)  # transformers' save, push_to_hub=False
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            return upload_saved_folder(self, save_directory, repo_id, token=kwargs.get("token"), **hub_kwargs)
        if hub_kwargs:
            raise TypeError(f"{sorted(hub_kwargs)} only apply with push_to_hub=True.")


__all__ = [
    "LIBRARY_NAME",
    "GEARHubMixin",
    "create_model_card",
    "model_card_template_path",
    "model_kind",
    "push_to_hub",
    "upload_saved_folder",
    "write_model_card",
]
