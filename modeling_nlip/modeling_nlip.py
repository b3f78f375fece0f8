# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP dual encoder: an image tower and a text tower (any transformers backbones) projected into one space.

Remote-code safe: imports only torch, transformers and sibling files, so `save_pretrained` can copy it next to a
checkpoint and users without the `nlip` package load it with `trust_remote_code=True`.
"""


import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_nlip import NLIPConfig

logger = logging.get_logger(__name__)


@dataclass
class NLIPOutput(ModelOutput):
    """
    Output of [`NLIPModel`], the same contract as transformers' `CLIPOutput`.

    Args:
        loss: symmetric contrastive (InfoNCE) loss, when `return_loss=True`.
        logits_per_image: `[n_images, n_texts]` scaled cosine similarities.
        logits_per_text: `[n_texts, n_images]`, the transpose.
        text_embeds / image_embeds: L2-normalised projected embeddings.
        text_model_output / vision_model_output: the towers' own outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ["text_model_output", "vision_model_output"] else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def per_sample_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric per-pair InfoNCE `½(CE_i(row i) + CE_i(column i))` of a square similarity-logit matrix, `[B]`: the
    diagonal holds the matching pairs."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    rows = nn.functional.cross_entropy(logits, targets, reduction="none")
    columns = nn.functional.cross_entropy(logits.T, targets, reduction="none")
    return (rows + columns) / 2


def symmetric_contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: the mean of the text->image and image->text cross-entropies with the diagonal as targets."""
    return per_sample_info_nce(logits_per_text).mean()


def image_tokens(hidden_state: torch.Tensor) -> torch.Tensor:
    """An image tower's output as tokens `[batch, tokens, width]`: a CNN feature map `[batch, channels, height, width]`
    (timm ResNet / EfficientNet / ConvNeXt towers) becomes `[batch, height * width, channels]`; token sequences (ViT,
    CLIP, timm ViTs) are returned unchanged."""
    if hidden_state.dim() == 4:
        return hidden_state.flatten(2).transpose(1, 2)
    return hidden_state


def tower_hidden_size(tower: nn.Module) -> int:
    """Width of a tower's outputs: its config's `hidden_size`, or the `num_features` of a timm backbone
    (`TimmWrapperModel`, whose config has no `hidden_size`)."""
    hidden_size = getattr(tower.config, "hidden_size", None)
    if hidden_size is None and hasattr(tower, "timm_model"):
        hidden_size = tower.timm_model.num_features
    if not isinstance(hidden_size, int):
        raise ValueError(
            f"Cannot tell the output width of the {type(tower).__name__} tower: its config has no `hidden_size` and it "
            "is not a timm backbone."
        )
    return hidden_size


def pool_tower_output(outputs: BaseModelOutputWithPooling, mode: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per example from a tower's output: its pooler, the masked token mean, or the first token. A CNN
    feature map (`[batch, channels, height, width]`) is read as `height * width` tokens (`image_tokens`)."""
    if mode == "pooler":
        if outputs.pooler_output is None:
            raise ValueError("This tower has no pooler_output; set NLIPConfig vision_pooling/text_pooling to 'mean' or 'cls'.")
        return outputs.pooler_output
    is_feature_map = outputs.last_hidden_state.dim() == 4
    hidden = image_tokens(outputs.last_hidden_state)
    if mode == "cls":
        if is_feature_map:
            raise ValueError("A CNN image tower has no class token: set NLIPConfig.vision_pooling to 'pooler' or 'mean'.")
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class NLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the flags shared by every NLIP head."""

    config: NLIPConfig
    base_model_prefix = "nlip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Auto classes besides the one given to `register_for_auto_class` that a saved checkpoint's `auto_map` names.
    _extra_auto_classes: tuple[str, ...] = ()

    @classmethod
    def is_custom_code(cls) -> bool:
        """NLIP lives outside `transformers.` but initialises with `transformers.initialization` and ties nothing, so the
        towers must keep their own init schemes (custom-code mode would skip CLIP's attention/MLP initialisation)."""
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus `auto_map` entries for `_extra_auto_classes` (remote code)."""
        if self._auto_class is not None and self._extra_auto_classes:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            target = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            auto_map.update(dict.fromkeys(self._extra_auto_classes, target))
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def freeze_towers(self, vision: bool = False, text: bool = False, unfreeze_last_n: int = 0) -> list[str]:
        """
        Lock pretrained towers, LiT-style (Zhai et al., 2022): their parameters stop requiring gradient and the locked
        modules stay in eval mode (batch-norm statistics and dropout frozen) also after `model.train()`, so only the
        projections, the logit scale (and any unlocked part) train.

        Args:
            vision / text (`bool`): lock the image / text tower (the text encoder of the dual encoder; a captioner's
                decoder is never locked).
            unfreeze_last_n (`int`, defaults to 0): leave the last `n` entries of each locked tower's block list
                trainable (transformer layers; a timm CNN's stages), with every module after them (final norm, conv
                head). 0 locks the whole tower.

        Returns the names of the parameters that were locked. Locking is a training-time setting: it is not saved
        with the checkpoint.
        """
        if isinstance(unfreeze_last_n, bool) or not isinstance(unfreeze_last_n, int) or unfreeze_last_n < 0:
            raise ValueError(f"`unfreeze_last_n` must be a non-negative integer, got {unfreeze_last_n!r}.")
        locked: list[str] = []
        frozen_modules = list(getattr(self, "_frozen_modules", []))
        for wanted, name in ((vision, "vision_model"), (text, "text_model")):
            if not wanted:
                continue
            tower = getattr(self, name, None)
            if tower is None:
                raise ValueError(f"{type(self).__name__} has no {name} to freeze.")
            trainable = _last_blocks_parameters(tower, unfreeze_last_n, name) if unfreeze_last_n else set()
            for param_name, param in tower.named_parameters():
                if param_name not in trainable:
                    param.requires_grad_(False)
                    locked.append(f"{name}.{param_name}")
            frozen_modules.extend(_fully_frozen_modules(tower))
        self._frozen_modules = frozen_modules
        self.train(self.training)
        return locked

    def frozen_tower_names(self) -> list[str]:
        """The towers (`"vision_model"`, `"text_model"`) none of whose parameters train."""
        return [
            name
            for name in ("vision_model", "text_model")
            if getattr(self, name, None) is not None
            and not any(p.requires_grad for p in getattr(self, name).parameters())
        ]

    def train(self, mode: bool = True):
        """`nn.Module.train`, keeping the modules locked by `freeze_towers` in eval mode."""
        super().train(mode)
        for module in getattr(self, "_frozen_modules", ()):
            module.train(False)
        return self

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, NLIPModel):
            factor = self.config.initializer_factor
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


_BLOCK_LIST_NAMES = ("layers", "layer", "blocks", "stages", "resblocks", "h")


def _last_blocks_parameters(tower: nn.Module, n: int, tower_name: str) -> set[str]:
    """Names of the parameters of the last `n` entries of the tower's block list (its longest `ModuleList` /
    `Sequential` named layers, layer, blocks, stages, ...) and of every parameter registered after that list."""
    candidates = [
        (name, module)
        for name, module in tower.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and name.split(".")[-1] in _BLOCK_LIST_NAMES
    ]
    if not candidates:
        raise ValueError(f"`unfreeze_last_n`: found no block list (layers / blocks / stages) in the {tower_name} tower.")
    list_name, blocks = max(candidates, key=lambda item: len(item[1]))
    if n > len(blocks):
        raise ValueError(
            f"`unfreeze_last_n`={n} exceeds the {len(blocks)} blocks of the {tower_name} tower ({list_name})."
        )
    prefixes = tuple(f"{list_name}.{i}." for i in range(len(blocks) - n, len(blocks)))
    names = [name for name, _ in tower.named_parameters()]
    in_blocks = [i for i, name in enumerate(names) if name.startswith(f"{list_name}.")]
    after = set(names[in_blocks[-1] + 1 :]) if in_blocks else set()
    return {name for name in names if name.startswith(prefixes)} | after


def _fully_frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of `module` (itself included) that have parameters, none of them trainable."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    found = []
    for child in module.children():
        found.extend(_fully_frozen_modules(child))
    return found


def tower_init_kwargs(config, pooling: str = "pooler") -> dict:
    """Constructor kwargs for a tower: drop its pooler (BERT, ViT, ...) when NLIP pools the hidden states itself,
    so no parameter goes without gradient (which DDP and gradient checkpointing reject)."""
    if pooling == "pooler":
        return {}
    model_class = _get_model_class(config, AutoModel._model_mapping)
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}


def build_tower(config, pooling: str = "pooler") -> PreTrainedModel:
    """Instantiate a backbone from its config via the Auto classes (CLIP vision/text, ViT, SigLIP, BERT, ...)."""
    return AutoModel.from_config(config, **tower_init_kwargs(config, pooling))


class NLIPModel(NLIPPreTrainedModel):
    """
    Contrastive image-text dual encoder with `CLIPModel`'s interface, so transformers' `zero-shot-image-classification`
    pipeline, `CLIPModel`-style training loops and the nlip noise-robust losses all apply unchanged.
    """

    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)
    # Parts of an NLIPForPreTraining checkpoint that the dual encoder does not use.
    _keys_to_ignore_on_load_unexpected = [r"^text_decoder\.", r"^enc_to_dec_proj\.", r"^ir_decoder\.", r"^concept_embeds$"]

    def __init__(
        self,
        config: NLIPConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if vision_model is None:
            vision_model = build_tower(config.vision_config, config.vision_pooling)
        if text_model is None:
            text_model = build_tower(config.text_config, config.text_pooling)
        self.vision_model = vision_model
        self.text_model = text_model
        # Share the sub-configs so that later config edits (attention implementation, ...) reach the towers.
        config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = config.vision_config
        self.text_model.config = config.text_config

        self.projection_dim = config.projection_dim
        self.vision_embed_dim = tower_hidden_size(self.vision_model)
        self.text_embed_dim = tower_hidden_size(self.text_model)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def _text_tower_outputs(self, input_ids, attention_mask, position_ids, token_type_ids, **kwargs):
        extra = {"position_ids": position_ids, "token_type_ids": token_type_ids}
        extra = {k: v for k, v in extra.items() if v is not None}
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra, **kwargs)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Text tower output whose `pooler_output` is the projected (unnormalised) text embedding."""
        outputs = self._text_tower_outputs(input_ids, attention_mask, position_ids, token_type_ids, **kwargs)
        pooled = pool_tower_output(outputs, self.config.text_pooling, attention_mask)
        outputs.pooler_output = self.text_projection(pooled)
        return outputs

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> tuple | BaseModelOutputWithPooling:
        """Image tower output whose `pooler_output` is the projected (unnormalised) image embedding."""
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        pooled = pool_tower_output(outputs, self.config.vision_pooling)
        outputs.pooler_output = self.visual_projection(pooled)
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        vision_pooled_output: torch.FloatTensor | None = None,
        text_pooled_output: torch.FloatTensor | None = None,
        **kwargs,
    ) -> NLIPOutput:
        r"""
        Embeds images and texts and scores every pair.

        return_loss (`bool`, *optional*):
            Whether to return the symmetric contrastive loss over the batch (CLIP's loss). The noise-robust losses
            (NLIP, NPC, SRCL) live in `trainers.losses` and consume this output's embeddings.
        vision_pooled_output (`torch.FloatTensor` of shape `[batch, vision width]`, *optional*):
            The image tower's pooled output (before `visual_projection`), e.g. a locked tower's cached features,
            instead of `pixel_values`: the tower is not run.
        text_pooled_output (`torch.FloatTensor` of shape `[batch, text width]`, *optional*):
            Likewise for the text tower, instead of `input_ids`.
        """
        tower_kwargs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None}
        if vision_pooled_output is not None:
            vision_outputs = BaseModelOutputWithPooling(pooler_output=self.visual_projection(vision_pooled_output))
        else:
            vision_outputs = self.get_image_features(pixel_values=pixel_values, **tower_kwargs)
        if text_pooled_output is not None:
            text_outputs = BaseModelOutputWithPooling(pooler_output=self.text_projection(text_pooled_output))
        else:
            text_outputs = self.get_text_features(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                token_type_ids=token_type_ids,
                **tower_kwargs,
            )
        image_embeds = vision_outputs.pooler_output / vision_outputs.pooler_output.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_outputs.pooler_output / text_outputs.pooler_output.norm(p=2, dim=-1, keepdim=True)

        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device)) * self.logit_scale.exp().to(
            text_embeds.device
        )
        logits_per_image = logits_per_text.t()
        loss = symmetric_contrastive_loss(logits_per_text) if return_loss else None

        return NLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        **kwargs,
    ) -> "NLIPModel":
        """
        Build an NLIP dual encoder from two pretrained towers (local folders or Hub ids); the projections are new.

        A full CLIP checkpoint given as a tower contributes its vision (resp. text) transformer; a timm checkpoint
        folder (`model_type` "timm_wrapper", e.g. written by `nlip-convert-efficientnet-lite0` or any `timm/...` Hub
        model) becomes a `TimmWrapperModel` image tower (a CNN's feature map is its image tokens, its global pool
        the pooled output; build the matching processor with `NLIPProcessor.from_vision_text_pretrained`). Keyword arguments
        prefixed `vision_` / `text_` go to that tower's `from_pretrained`; the rest (`projection_dim`,
        `text_pooling`, ...) to [`NLIPConfig`]. Sentence-transformers text towers (MiniLM, MPNet) are trained with
        mean pooling: pass `text_pooling="mean"`.
        """
        config_kwargs = {k: kwargs.pop(k) for k in ("vision_pooling", "text_pooling") if k in kwargs}
        vision_kwargs = {k[len("vision_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("vision_")}
        text_kwargs = {k[len("text_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("text_")}
        kwargs.update(config_kwargs)
        vision_model = _load_tower(vision_model_name_or_path, "vision_config", vision_kwargs, kwargs.get("vision_pooling", "pooler"))
        text_model = _load_tower(text_model_name_or_path, "text_config", text_kwargs, kwargs.get("text_pooling", "pooler"))
        config = NLIPConfig.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        model = cls(config, vision_model=vision_model, text_model=text_model)
        logger.warning(
            "The projection layers and logit scale of this NLIPModel are newly initialised: train it before use."
        )
        return model


def _load_tower(name_or_path: str, sub_config_name: str, kwargs: dict, pooling: str) -> PreTrainedModel:
    """Load one pretrained tower; from a composite checkpoint (CLIP, SigLIP) take its `vision_config`/`text_config` part."""
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(name_or_path)
    if hasattr(config, sub_config_name) and getattr(config, sub_config_name) is not None:
        config = getattr(config, sub_config_name)
    return AutoModel.from_pretrained(name_or_path, config=config, **tower_init_kwargs(config, pooling), **kwargs)


__all__ = ["NLIPOutput", "NLIPPreTrainedModel", "NLIPModel", "image_tokens", "pool_tower_output", "tower_hidden_size"]
