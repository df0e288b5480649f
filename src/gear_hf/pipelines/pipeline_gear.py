"""`GEARPipeline`: class- or text-conditional image generation with a GEAR tokenizer and a LlamaGen AR generator.

The pipeline is a `diffusers.DiffusionPipeline`, so it saves to / loads from a `model_index.json` folder (or Hub
repo) with `vq_model/`, `transformer/` (and, text-to-image, `text_encoder/` + `tokenizer/`) subfolders, supports
`enable_model_cpu_offload()`, and follows diffusers' calling conventions (`prompt`, `prompt_embeds` /
`prompt_attention_mask`, `negative_prompt`, `generator`, `num_images_per_prompt`, `output_type`, `return_dict`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from transformers import CompileConfig

# Module-level imports on purpose: diffusers' loader finds component classes in `sys.modules` by the module path
# written in model_index.json (e.g. "gear_hf.models.modeling_gear_tokenizer"). Keep these module paths stable.
from ..models.modeling_gear_ar import GEARForCausalImageLM
from ..models.modeling_gear_tokenizer import GEARTokenizerModel
from ..sampling import SamplingConfig, check_generators, resolve_sampling_config
from ..text_encoder import check_caption_dim, encode_prompts
from .class_labels import (
    full_name_table,
    imagenet_id2label,
    is_placeholder_id2label,
    label_ids,
    name_table,
    normalize_id2label,
    resolve_class_labels,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GEARPipelineOutput(ImagePipelineOutput):
    """Output of [`GEARPipeline`] (an `ImagePipelineOutput`).

    Args:
        images: a list of `PIL.Image.Image`, a float array `(B, H, W, 3)` in [0, 1] (`"np"`), a float tensor
            `(B, 3, H, W)` in [0, 1] (`"pt"`) or the int64 token grids `(B, h, w)` (`"latent"`).
        class_labels: class-conditional: the class id of every image, `(B,)` int64 (labels repeated
            `num_images_per_prompt` times).
        prompts: text-conditional: the prompt of every image (None when `prompt_embeds` were given).
        sampling_config: every resolved sampling knob (preset, guidance, temperature, top-k/p), for the record.
    """

    class_labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    sampling_config: SamplingConfig | None = None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] `(B, C, H, W)` -> uint8 `(B, H, W, C)` exactly as the official GEAR / LlamaGen sampler:
    `clamp(127.5 * x + 128, 0, 255)` truncated (= round-half-up of `127.5 * (x + 1)`)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def check_components_compatible(vq_model: Any, transformer: Any, text_encoder: Any = None,
                                tokenizer: Any = None) -> None:
    """Raise `ValueError` unless the AR generator predicts tokens the tokenizer can decode (same codebook size, the
    same token grid and pixel stride) and, for a text-conditional generator, a text encoder of its caption width
    and a tokenizer are given (none for a class-conditional one)."""
    if not isinstance(vq_model, GEARTokenizerModel):
        raise TypeError(f"vq_model must be a GEARTokenizerModel, got {type(vq_model).__name__}.")
    if not isinstance(transformer, GEARForCausalImageLM):
        raise TypeError(f"transformer must be a GEARForCausalImageLM, got {type(transformer).__name__}.")
    tok, ar = vq_model.config, transformer.config
    if ar.is_text_conditional:
        if text_encoder is None or tokenizer is None:
            raise ValueError("The transformer is text-conditional (condition_type='text'): GEARPipeline needs its "
                             "text_encoder and tokenizer, e.g. from gear_hf.text_encoder.load_text_encoder(...).")
        check_caption_dim(text_encoder, ar.caption_dim)
    elif text_encoder is not None or tokenizer is not None:
        raise ValueError("The transformer is class-conditional: it takes no text_encoder / tokenizer (pass None), "
                         "or use a text-conditional transformer (GEARConfig(condition_type='text', ...)).")
    if tok.codebook_size != ar.vocab_size:
        raise ValueError(
            f"The tokenizer has codebook_size={tok.codebook_size} but the AR generator predicts vocab_size="
            f"{ar.vocab_size} token ids. Pair the generator with the tokenizer it was trained on (or build the AR "
            f"with GEARConfig(vocab_size={tok.codebook_size}, ...))."
        )
    if tok.grid_size != ar.grid_size:
        raise ValueError(
            f"The AR generator samples a {ar.grid_size}x{ar.grid_size} token grid (image_size {ar.image_size} // "
            f"downsample_factor {ar.downsample_factor}) but the tokenizer's grid is {tok.grid_size}x"
            f"{tok.grid_size} (image_size {tok.image_size} // downsample_factor {tok.downsample_factor}). Use "
            "matching image sizes, e.g. GEARConfig(image_size=..., downsample_factor=...) equal to the tokenizer's."
        )
    if tok.downsample_factor != ar.downsample_factor:
        raise ValueError(
            f"The AR generator assumes downsample_factor={ar.downsample_factor} (image_size {ar.image_size}) but the "
            f"tokenizer decodes each token to {tok.downsample_factor}x{tok.downsample_factor} pixels, so images "
            f"would be {ar.grid_size * tok.downsample_factor} px. Set GEARConfig(downsample_factor="
            f"{tok.downsample_factor}, image_size={ar.grid_size * tok.downsample_factor})."
        )


class GEARPipeline(DiffusionPipeline):
    r"""Image generation with GEAR: an AR transformer samples a token grid conditioned on class labels or on a
    prompt, the tokenizer decodes it to pixels.

    Args:
        vq_model ([`GEARTokenizerModel`]): the image tokenizer (VQ / LFQ / IBQ) that decodes tokens to images.
        transformer ([`GEARForCausalImageLM`]): the LlamaGen generator of image tokens, class- or text-conditional.
            Its `vocab_size` must equal the tokenizer's `codebook_size` and its token grid the tokenizer's grid.
        text_encoder (`transformers.PreTrainedModel`, *optional*): text-to-image only: the frozen text encoder whose
            `last_hidden_state` conditions the transformer (GEAR: `Qwen3Model` of Qwen/Qwen3-1.7B); its hidden size
            must equal `transformer.config.caption_dim`.
        tokenizer (*optional*): text-to-image only: the text encoder's tokenizer.
        id2label (`dict[int, str]`, *optional*): class names, e.g. the ImageNet names (comma-separated synonyms
            allowed: "tench" and "Tinca tinca" both work for "tench, Tinca tinca"), or `"imagenet-1k"` for the
            standard ImageNet names. Defaults to `transformer.config.id2label` when that holds real names. Saved
            in `model_index.json`; can be replaced later with `pipe.id2label = {...}`.

    ```python
    >>> pipe = GEARPipeline.from_pretrained("me/gear-vq-llamagen-b")
    >>> images = pipe("golden retriever", preset="demo", generator=torch.Generator().manual_seed(0)).images
    >>> gens = [torch.Generator().manual_seed(i) for i in range(8)]  # one per image: batch-independent results
    >>> out = pipe([207, 360, 387, 974] * 2, preset="fid", generator=gens, output_type="np")
    >>> t2i = GEARPipeline.from_pretrained("me/gear-t2i-1b")  # text-to-image: same call with prompts
    >>> images = t2i("a red sports car on a beach", guidance_scale=4.0, num_images_per_prompt=2).images
    ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vq_model"
    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        vq_model: GEARTokenizerModel,
        transformer: GEARForCausalImageLM,
        text_encoder: Any = None,
        tokenizer: Any = None,
        id2label: dict | str | None = None,  # {class_id: name} (str keys in model_index.json)
    ):
        super().__init__()
        check_components_compatible(vq_model, transformer, text_encoder, tokenizer)
        self.register_modules(vq_model=vq_model, transformer=transformer, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.id2label = id2label
        self.image_processor = VaeImageProcessor(vae_scale_factor=vq_model.config.downsample_factor,
                                                 do_resize=False, do_normalize=True)

    # ------------------------------------------------------------------------------------------- labels
    @property
    def is_text_to_image(self) -> bool:
        return self.transformer.config.is_text_conditional

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.transformer.config.grid_size * self.vq_model.config.downsample_factor

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name: the pipeline's `id2label`, else the transformer config's (if it holds real names)."""
        own = self.config.get("id2label")
        if own:
            return {int(k): v for k, v in sorted(own.items(), key=lambda kv: int(kv[0]))}
        from_config = getattr(self.transformer.config, "id2label", None)
        if is_placeholder_id2label(from_config):
            return {}
        return normalize_id2label(from_config, self.num_classes, "transformer.config.id2label") or {}

    @id2label.setter
    def id2label(self, id2label: Mapping | str | None) -> None:
        id2label = normalize_id2label(id2label, self.num_classes, "id2label")
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} if id2label else None)

    @property
    def label2id(self) -> dict[str, int]:
        """Lower-cased name (the full string and each comma-separated synonym) -> class id: a class's own full
        name first (as `get_label_ids`), else the first class carrying the name."""
        table = {name: ids[0] for name, ids in name_table(self.id2label).items()}
        table.update({name: ids[0] for name, ids in full_name_table(self.id2label).items() if len(ids) == 1})
        return table

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Map class names (case-insensitive, any comma-separated synonym) to class ids."""
        return label_ids(label, self.id2label, self.num_classes)

    # ------------------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: str | Sequence[str], device: torch.device | None = None,
                      num_images_per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts with the frozen text encoder → `(prompt_embeds (B·n, L, C), prompt_attention_mask
        (B·n, L))`, each prompt's rows adjacent; right-padded / truncated to the transformer's `text_length`."""
        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, prompt,
                                      max_length=self.transformer.config.text_length, device=device)
        return embeds.repeat_interleave(num_images_per_prompt, 0), mask.repeat_interleave(num_images_per_prompt, 0)

    def _resolve_prompts(self, prompt: Any) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt):
            raise TypeError("This pipeline is text-to-image: prompt must be a string or a list of strings (class ids "
                            "belong to a class-conditional pipeline).")
        if len(prompt) == 0:
            raise ValueError("prompt is an empty list; pass at least one prompt.")
        return list(prompt)

    # ------------------------------------------------------------------------------------------- checks
    def check_inputs(self, num_conditions: int, num_images_per_prompt: int, generator: Any, output_type: str,
                     sampling: dict[str, Any]) -> SamplingConfig:
        """Validate everything before any compute; returns the resolved sampling settings."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES} ('latent' returns the token grids), "
                             f"got {output_type!r}.")
        if not isinstance(num_images_per_prompt, numbers.Integral) or isinstance(num_images_per_prompt, bool) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}.")
        check_generators(generator, num_conditions * int(num_images_per_prompt),
                         f" ({num_conditions} conditions x num_images_per_prompt={num_images_per_prompt})")
        settings = resolve_sampling_config(vocab_size=self.transformer.config.vocab_size, **sampling)
        if settings.guidance_scale > 1.0 and not self.is_text_to_image and not self.transformer.config.has_null_class:
            raise ValueError(
                f"guidance_scale={settings.guidance_scale} needs the null class, but this generator was built "
                "without one (class_dropout_prob == 0). Use guidance_scale=1.0 (e.g. preset='fid')."
            )
        return settings

    def _text_prompts(self, prompt: Any, prompt_embeds: torch.Tensor | None) -> tuple[list[str] | None, int]:
        """The prompts of a text-to-image call (None when `prompt_embeds` are given) and their count, without
        running the text encoder."""
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("Pass either prompt or prompt_embeds, not both.")
            return None, prompt_embeds.shape[0]
        if prompt is None:
            raise ValueError("This pipeline is text-to-image: pass prompt=... (or prompt_embeds).")
        prompts = self._resolve_prompts(prompt)
        return prompts, len(prompts)

    def _text_condition(self, prompts, prompt_embeds, prompt_attention_mask, negative_prompt, negative_prompt_embeds,
                        negative_prompt_attention_mask, num_images_per_prompt, guided, device) -> dict[str, Any]:
        """`generate_images` keyword arguments of a text-to-image call (prompts encoded here unless given)."""
        if prompts is None:
            embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, 0)
            mask = (None if prompt_attention_mask is None else
                    prompt_attention_mask.to(device).repeat_interleave(num_images_per_prompt, 0))
        else:
            embeds, mask = self.encode_prompt(prompts, device, num_images_per_prompt)
        kwargs = {"text_embeds": embeds, "text_attention_mask": mask}
        if guided:  # the unconditional half: the encoding of "" (official), or the caller's negative prompt
            if negative_prompt_embeds is None:
                negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                    negative_prompt if negative_prompt is not None else "", device)
            kwargs.update(null_text_embeds=negative_prompt_embeds.to(device),
                          null_text_attention_mask=(None if negative_prompt_attention_mask is None
                                                    else negative_prompt_attention_mask.to(device)))
        return kwargs

    # ------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: int | str | Sequence[int | str] | torch.Tensor | None = None,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt: str | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_interval: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool | None = None,
        preset: str | SamplingConfig | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        compile: bool | CompileConfig = False,
    ) -> GEARPipelineOutput | tuple:
        r"""Generate images of the given classes, or for the given prompts.

        Args:
            prompt: text-to-image: a prompt or a list of prompts. Class-conditional pipelines take their classes
                here too (positionally), as with `class_labels`.
            class_labels: class-conditional: class ids (`int`, list, 1-D tensor) and/or class names from
                `pipe.id2label`.
            prompt_embeds, prompt_attention_mask: text-to-image: precomputed `(B, L, C)` encoder features and their
                `(B, L)` mask, instead of `prompt` (e.g. from `pipe.encode_prompt`).
            negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask: the unconditional half of
                classifier-free guidance; default: the encoding of `""`, as in the official code.
            guidance_scale: classifier-free guidance scale (1 = off). None takes the preset's value.
            guidance_interval: guide only image tokens `0 .. n + 1` (official `cfg_interval`); None = all.
            temperature, top_k, top_p, do_sample: sampling knobs (top_k 0 / top_p 1 disable the filters;
                `do_sample=False` is greedy). None takes the preset's value.
            preset: `"fid"` (GEAR's evaluation protocol: guidance 1, top-k 0, top-p 1, temperature 1 — also what
                None gives) or `"demo"` (LlamaGen's demo: guidance 4, top-k 2000); explicit arguments override it.
            num_images_per_prompt: images per label / prompt (its images are adjacent in the output).
            generator: one `torch.Generator` for the batch, or one per image (`len(conditions) *
                num_images_per_prompt`): image i then depends only on its condition and `generator[i]`, not on the
                batch it is generated in.
            output_type: `"pil"` (uint8 rounding of the official sampler), `"np"` / `"pt"` (float in [0, 1],
                `VaeImageProcessor` layout), or `"latent"` (the int64 token grids, not decoded).
            return_dict: return a [`GEARPipelineOutput`] (else a tuple `(images,)`).
            compile: `torch.compile` the transformer's decode step (True, or a `transformers.CompileConfig`); the
                first call per batch size compiles, later ones reuse it (see `GEARForCausalImageLM.generate_images`).
        """
        # 1. Check inputs.
        sampling = dict(preset=preset, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                        temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample)
        device = self._execution_device
        n = num_images_per_prompt
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("This pipeline is text-to-image: pass prompt=... (class_labels are for a "
                                 "class-conditional pipeline).")
            prompts, count = self._text_prompts(prompt, prompt_embeds)
            settings = self.check_inputs(count, n, generator, output_type, sampling)
            # 2. Encode the prompts (and the unconditional prompt under guidance).
            condition = self._text_condition(prompts, prompt_embeds, prompt_attention_mask, negative_prompt,
                                             negative_prompt_embeds, negative_prompt_attention_mask, n,
                                             settings.guidance_scale > 1.0, device)
            labels = None
            if prompts is not None:
                prompts = [p for p in prompts for _ in range(n)]
        else:
            text_inputs = (prompt_embeds, prompt_attention_mask, negative_prompt, negative_prompt_embeds,
                           negative_prompt_attention_mask)
            if any(x is not None for x in text_inputs):
                raise ValueError("This pipeline is class-conditional (no text encoder): prompt_embeds, attention "
                                 "masks and negative prompts apply to text-to-image pipelines only.")
            if prompt is not None and class_labels is not None:
                raise ValueError("Pass the classes once: positionally or as class_labels=..., not both.")
            class_ids = resolve_class_labels(class_labels if class_labels is not None else prompt, self.id2label, self.num_classes)
            settings = self.check_inputs(len(class_ids), n, generator, output_type, sampling)
            # 2. Prepare labels: each label repeated num_images_per_prompt times, adjacent.
            labels = torch.tensor(class_ids, dtype=torch.long, device=device).repeat_interleave(n)
            condition, prompts = {"class_labels": labels}, None

        # 3. Sample the token grids, with a progress bar over the decoded raster positions.
        num_tokens = self.transformer.config.num_image_tokens
        with self.progress_bar(total=num_tokens) as progress_bar:
            tokens = self.transformer.generate_images(
                **condition, preset=settings, generator=generator, compile=compile,
                callback=lambda _: progress_bar.update(),
            )
        settings = getattr(tokens, "sampling_config", settings)

        # 4. Decode the tokens to pixels (skipped for output_type="latent").
        if output_type == "latent":
            images = tokens
        else:
            decoded = self.vq_model.decode(tokens)

            # 5. Postprocess: clamp to [-1, 1]; PIL via the official uint8 rounding, np/pt as VaeImageProcessor.
            decoded = decoded.float().clamp(-1, 1)
            if output_type == "pil":
                images = [PIL.Image.fromarray(array) for array in to_uint8(decoded).cpu().numpy()]
            else:
                images = self.image_processor.postprocess(decoded, output_type=output_type)

        # 6. Offload hooks.
        self.maybe_free_model_hooks()

        # 7. Output.
        if not return_dict:
            return (images,)
        return GEARPipelineOutput(images=images, class_labels=None if labels is None else labels.cpu(),
                                  prompts=prompts, sampling_config=settings)

    # ------------------------------------------------------------------------------------------- hub
    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, api=None, model_card=None, **card_kwargs):
        """Upload the pipeline (model_index.json, vq_model/, transformer/) with a gear_hf model card.

        Card arguments (license, datasets, tags, training, metrics, ...) go to `gear_hf.hub.create_model_card`;
        see `gear_hf.hub.push_to_hub` for `api` and `model_card`.
        """
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, api=api, token=token, private=private, commit_message=commit_message,
                           create_pr=create_pr, model_card=model_card, **card_kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str | None = None, push_to_hub: bool = False, **kwargs):
        """diffusers' `save_pretrained`; with `push_to_hub=True` the folder is then uploaded with a gear_hf model
        card (kwargs: `repo_id`, `commit_message`, `private`, `token`, `create_pr`, `api` and card arguments)."""
        save_kwargs = {k: kwargs.pop(k) for k in ("use_flashpack",) if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, push_to_hub=False, **save_kwargs)
        if push_to_hub:
            from ..hub import upload_saved_folder

            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            return upload_saved_folder(self, save_directory, repo_id, **kwargs)


__all__ = ["GEARPipeline", "GEARPipelineOutput", "check_components_compatible", "imagenet_id2label", "to_uint8"]
