# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""NLIP pre-training model: every NLIP module and the full objective `w_itc·L_ITC + w_lm·L_LM + w_ir·L_IR`.

Its weights carry `NLIPModel`'s and `NLIPForCaptioning`'s attribute names, so its checkpoint loads into either head.
Trainer logic (noise estimation, synthetic-caption refresh) stays outside: the contrastive term takes a loss function
or per-sample weights. Remote-code safe: imports only torch, transformers and sibling files.
"""


from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import ViTMAEConfig
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEForPreTraining
from transformers.utils import ModelOutput, can_return_tuple

from .concept_bank import left_pad
from .configuration_nlip import NLIPConfig
from .modeling_nlip import NLIPModel, build_tower, per_sample_info_nce, pool_tower_output
from .modeling_nlip_captioning import IGNORE_INDEX, NLIPCaptioningPreTrainedModel, NLIPForCaptioning


@dataclass
class NLIPForPreTrainingOutput(ModelOutput):
    """
    Output of [`NLIPForPreTraining`].

    Args:
        loss: `itc_weight·contrastive_loss + lm_weight·lm_loss + ir_weight·ir_loss` (terms that were computed).
        contrastive_loss / lm_loss / ir_loss: the three terms.
        contrastive_per_sample_loss: `[batch]` plain symmetric InfoNCE `CE_i` of each pair (for noise estimation;
            with `return_loss`, as it depends on the whole batch).
        lm_per_sample_loss: `[batch]` mean caption-token loss of each sample.
        logits_per_image / logits_per_text / image_embeds / text_embeds: as in `NLIPOutput`.
        synthetic_text_embeds: normalised embeddings of the synthetic captions, when given.
        lm_logits: the decoder's logits over `[concept prefix] + caption`.
        ir_logits: `[batch, patches, patch_size²·channels]` reconstructed patches; ir_mask: `[batch, patches]`, 1 =
            masked (reconstructed) patch.
        text_model_output / vision_model_output: the towers' own outputs.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    ir_loss: torch.FloatTensor | None = None
    contrastive_per_sample_loss: torch.FloatTensor | None = None
    lm_per_sample_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    synthetic_text_embeds: torch.FloatTensor | None = None
    lm_logits: torch.FloatTensor | None = None
    ir_logits: torch.FloatTensor | None = None
    ir_mask: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else self[k].to_tuple() for k in self.keys()
        )


def pair_info_nce(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric per-sample InfoNCE `CE_i = ½(CE_i(image→texts) + CE_i(text→images))` of normalised embeddings, `[B]`."""
    return per_sample_info_nce(logit_scale * image_embeds.float() @ text_embeds.float().T)


class NLIPMaskedImageDecoder(nn.Module):
    """
    MAE-style masked-image reconstruction head (transformers' `ViTMAEDecoder`) for any image tower with patch tokens.

    Masked patches are blanked in the input image (0 = the dataset mean after normalisation); the decoder sees the
    tower's outputs at the visible patches (plus its first token as the class token, or their mean for towers without
    one), inserts mask tokens at the masked ones and predicts their pixels. Loss: MSE on the masked patches of the
    (per-patch normalised, with `ir_norm_pix_loss`) pixels.
    """

    # Reused from transformers: `[B, C, H, W]` -> `[B, patches, patch_size²·C]`; reads `self.config.patch_size/num_channels`.
    patchify = ViTMAEForPreTraining.patchify

    def __init__(self, config: NLIPConfig):
        super().__init__()
        vision = config.vision_config
        image_size, patch_size = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not isinstance(image_size, int) or not isinstance(patch_size, int) or image_size % patch_size:
            raise ValueError(
                "Masked-image reconstruction (NLIPConfig.ir_weight > 0) needs a patch-based image tower whose "
                f"vision_config has integer image_size divisible by patch_size; got {image_size!r} and {patch_size!r}."
            )
        self.config = ViTMAEConfig(
            hidden_size=vision.hidden_size,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=getattr(vision, "num_channels", 3),
            decoder_hidden_size=config.ir_decoder_hidden_size,
            decoder_num_hidden_layers=config.ir_decoder_num_hidden_layers,
            decoder_num_attention_heads=config.ir_decoder_num_attention_heads,
            decoder_intermediate_size=4 * config.ir_decoder_hidden_size,
            mask_ratio=config.mask_ratio,
            norm_pix_loss=config.ir_norm_pix_loss,
        )
        self.config._attn_implementation = getattr(vision, "_attn_implementation", None) or "sdpa"
        self.num_patches = (image_size // patch_size) ** 2
        self.decoder = ViTMAEDecoder(self.config, num_patches=self.num_patches)

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViT-MAE's initialisation (normal(0.02) linears, unit LayerNorms, fixed 2-D sin-cos positions)."""
        for module in self.decoder.modules():
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, std=self.config.initializer_range)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
        self.decoder.initialize_weights(self.num_patches)

    def random_masking(self, batch_size: int, noise: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
        """MAE's per-sample random masking: keep the patches with the smallest `noise`. Returns `(ids_keep,
        ids_restore, mask)`, mask 1 = masked."""
        if noise is None:
            noise = torch.rand(batch_size, self.num_patches, device=device)
        elif noise.shape != (batch_size, self.num_patches):
            raise ValueError(f"`noise` must have shape {(batch_size, self.num_patches)}, got {tuple(noise.shape)}.")
        num_keep = max(1, int(self.num_patches * (1 - self.config.mask_ratio)))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(batch_size, self.num_patches, device=device)
        mask[:, :num_keep] = 0
        return ids_shuffle[:, :num_keep], ids_restore, torch.gather(mask, 1, ids_restore)

    def mask_pixels(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Blank (set to 0) the masked patches of the images."""
        grid = int(self.num_patches**0.5)
        pixel_mask = mask.view(-1, 1, grid, grid).repeat_interleave(self.config.patch_size, 2)
        pixel_mask = pixel_mask.repeat_interleave(self.config.patch_size, 3)
        return pixel_values * (1 - pixel_mask.to(pixel_values.dtype))

    def forward(
        self, tower_hidden_states: torch.Tensor, pixel_values: torch.Tensor, ids_keep, ids_restore, mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct from the tower's output on the masked image; returns `(loss, predicted patches)`."""
        num_prefix = tower_hidden_states.shape[1] - self.num_patches
        if num_prefix < 0:
            raise ValueError(
                f"The image tower returned {tower_hidden_states.shape[1]} tokens for {self.num_patches} patches; "
                "masked-image reconstruction needs one output token per patch."
            )
        patch_tokens = tower_hidden_states[:, num_prefix:]
        cls_token = tower_hidden_states[:, :1] if num_prefix else patch_tokens.mean(dim=1, keepdim=True)
        visible = torch.gather(patch_tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patch_tokens.shape[-1]))
        predicted = self.decoder(torch.cat([cls_token, visible], dim=1), ids_restore).logits
        target = self.patchify(pixel_values).to(predicted.dtype)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((predicted.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum(), predicted


class NLIPForPreTraining(NLIPCaptioningPreTrainedModel):
    """
    All NLIP modules — image and text towers with projections (`NLIPModel`'s names), the captioning decoder
    (`NLIPForCaptioning`'s names), the concept bank, and an optional masked-image reconstruction decoder — computing
    NLIP's objective `L = itc_weight·L_ITC + lm_weight·L_LM + ir_weight·L_IR`.
    """

    # The checkpoint also loads, through remote code, into the other heads (same weight names).
    _sibling_auto_map = {
        "AutoModel": "modeling_nlip.NLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_nlip.NLIPModel",
        "AutoModelForImageTextToText": "modeling_nlip_captioning.NLIPForCaptioning",
    }

    # Every term is a per-batch mean: the Trainer must average over gradient accumulation itself (no
    # `num_items_in_batch`, which would rescale the LM term alone).
    accepts_loss_kwargs = False
    # `NLIPModel`'s text path, reused as is.
    _text_tower_outputs = NLIPModel._text_tower_outputs
    get_text_features = NLIPModel.get_text_features

    def __init__(self, config: NLIPConfig):
        super().__init__(config)
        self._init_vision_and_decoder(config)
        self.text_model = build_tower(config.text_config, config.text_pooling)
        config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.text_model.config = config.text_config
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.ir_decoder = NLIPMaskedImageDecoder(config) if config.ir_weight > 0 else None
        self._init_concept_bank()
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ViTMAEDecoder):
            self.ir_decoder.init_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`save_pretrained`, with `auto_map` entries that load the checkpoint into `NLIPModel` and `NLIPForCaptioning`."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._sibling_auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def captioner(self) -> NLIPForCaptioning:
        """An [`NLIPForCaptioning`] sharing this model's image tower, projection, decoder and config, and its current
        concept bank (no copy: it captions with the current weights, e.g. to refresh synthetic captions in training)."""
        with torch.device("meta"):
            view = NLIPForCaptioning(self.config)
        for name in ("vision_model", "visual_projection", "text_decoder", "enc_to_dec_proj"):
            setattr(view, name, getattr(self, name))
        view.concept_embeds = self.concept_embeds
        view._frozen_modules = getattr(self, "_frozen_modules", [])  # towers locked by `freeze_towers` stay in eval
        return view.train(self.training)

    def _masked_image_reconstruction(self, pixel_values: torch.Tensor, noise: torch.Tensor | None):
        ids_keep, ids_restore, mask = self.ir_decoder.random_masking(pixel_values.shape[0], noise, pixel_values.device)
        masked = self.vision_model(pixel_values=self.ir_decoder.mask_pixels(pixel_values, mask), return_dict=True)
        loss, predicted = self.ir_decoder(masked.last_hidden_state, pixel_values, ids_keep, ids_restore, mask)
        return loss, predicted, mask

    def weighted_loss(
        self,
        contrastive_loss: torch.Tensor | None = None,
        lm_loss: torch.Tensor | None = None,
        ir_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pre-training objective `itc_weight·contrastive + lm_weight·lm + ir_weight·ir` of the terms given."""
        terms = ((self.config.itc_weight, contrastive_loss), (self.config.lm_weight, lm_loss), (self.config.ir_weight, ir_loss))
        return sum(weight * value for weight, value in terms if value is not None)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        concept_input_ids: torch.LongTensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        retrieve_concepts: bool = False,
        synthetic_input_ids: torch.LongTensor | None = None,
        synthetic_attention_mask: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
        lm_sample_weights: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        return_loss: bool = True,
        return_contrastive_loss: bool = True,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> NLIPForPreTrainingOutput:
        r"""
        Embeds the pairs, captions the images and (with `ir_weight > 0`) reconstructs masked patches.

        decoder_input_ids / decoder_attention_mask / labels (*optional*):
            The caption the decoder learns; default: `input_ids`/`attention_mask` (one tokenizer for both) and
            `labels` = those ids with `-100` on padding.
        concept_input_ids / concept_attention_mask (*optional*):
            Concept prefix of each image for the decoder (excluded from the LM loss).
        retrieve_concepts (`bool`, *optional*, defaults to `False`):
            Without `concept_input_ids`, prefix each caption with its image's top `config.num_concepts` concepts from
            the concept bank (retrieved with the detached image embedding), as `generate` does: the captioner learns
            to read the prefix it will see when captioning. No effect without a bank.
        synthetic_input_ids / synthetic_attention_mask (*optional*):
            Synthetic captions (noise completion), embedded by the text tower as a second positive per image.
        return_contrastive_loss (`bool`, *optional*, defaults to `True`):
            Compute the contrastive term: symmetric InfoNCE `mean_i w_i·CE_i`, with synthetic captions
            `mean_i w_i·½(CE(v_i,t_i) + CE(v_i,t̂_i))`. With False the caller brings its own (e.g. a noise-robust
            trainer's, from the returned `image_embeds` / `text_embeds` / `synthetic_text_embeds`): `loss` then holds
            only the captioning and reconstruction terms, and `weighted_loss(contrastive_loss=c, lm_loss=...,
            ir_loss=...)` gives the full objective.
        sample_weights (`[batch]`, *optional*): weights of the contrastive term's samples (e.g. NPC confidences).
        lm_sample_weights (`[batch]`, *optional*): weights of the LM term's samples (e.g. clean probabilities).
        noise (`[batch, patches]`, *optional*): masking noise of the reconstruction term (the patches with the lowest
            values stay visible; ViT-MAE's argument), for reproducible masks.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("NLIPForPreTraining needs both `input_ids` (captions) and `pixel_values` (images).")
        tower_kwargs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None}
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        image_embeds = self.visual_projection(pool_tower_output(vision_outputs, self.config.vision_pooling))
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, token_type_ids=token_type_ids,
            **tower_kwargs,
        )
        image_embeds = nn.functional.normalize(image_embeds, dim=-1)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        logit_scale = self.logit_scale.exp()
        logits_per_text = text_embeds @ image_embeds.T * logit_scale
        synthetic_text_embeds = None
        if synthetic_input_ids is not None:
            synthetic = self.get_text_features(input_ids=synthetic_input_ids, attention_mask=synthetic_attention_mask)
            synthetic_text_embeds = nn.functional.normalize(synthetic.pooler_output, dim=-1)
        losses: dict[str, torch.Tensor] = {}
        per_sample_itc = None
        if return_loss:
            per_sample_itc = pair_info_nce(image_embeds, text_embeds, logit_scale)
            if return_contrastive_loss:
                per_sample = per_sample_itc
                if synthetic_text_embeds is not None:
                    per_sample = (per_sample + pair_info_nce(image_embeds, synthetic_text_embeds, logit_scale)) / 2
                if sample_weights is not None:
                    per_sample = per_sample * torch.as_tensor(sample_weights, dtype=per_sample.dtype, device=per_sample.device)
                losses["contrastive_loss"] = per_sample.mean()

        lm_logits = lm_per_sample_loss = None
        if self.config.lm_weight > 0 or labels is not None:
            decoder_input_ids = input_ids if decoder_input_ids is None else decoder_input_ids
            if decoder_attention_mask is None:
                decoder_attention_mask = attention_mask if decoder_input_ids is input_ids else None
            if labels is None and return_loss:
                labels = decoder_input_ids
                if decoder_attention_mask is not None:
                    labels = labels.masked_fill(decoder_attention_mask == 0, IGNORE_INDEX)
            if retrieve_concepts and concept_input_ids is None and self.has_concept_bank and self.config.num_concepts > 0:
                rows = self.retrieved_prefix_rows(image_embeds.detach())
                concept_input_ids, concept_attention_mask = left_pad(
                    rows, self._special_token_id("pad_token_id") or 0, device=image_embeds.device
                )
            decoder_outputs, lm_loss, lm_per_sample_loss = self._decode(
                self.image_hidden_states(vision_outputs.last_hidden_state),
                decoder_input_ids,
                attention_mask=decoder_attention_mask,
                labels=labels,
                concept_input_ids=concept_input_ids,
                concept_attention_mask=concept_attention_mask,
                sample_weights=lm_sample_weights,
            )
            lm_logits = decoder_outputs.logits
            if lm_loss is not None:
                losses["lm_loss"] = lm_loss

        ir_logits = ir_mask = None
        if self.ir_decoder is not None:
            ir_loss, ir_logits, ir_mask = self._masked_image_reconstruction(pixel_values, noise)
            if return_loss:
                losses["ir_loss"] = ir_loss

        loss = self.weighted_loss(**losses) if losses else None
        return NLIPForPreTrainingOutput(
            loss=loss,
            contrastive_loss=losses.get("contrastive_loss"),
            lm_loss=losses.get("lm_loss"),
            ir_loss=losses.get("ir_loss"),
            contrastive_per_sample_loss=per_sample_itc,
            lm_per_sample_loss=lm_per_sample_loss,
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            synthetic_text_embeds=synthetic_text_embeds,
            lm_logits=lm_logits,
            ir_logits=ir_logits,
            ir_mask=ir_mask,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


__all__ = ["NLIPForPreTraining", "NLIPForPreTrainingOutput", "NLIPMaskedImageDecoder"]
