"""The LVLM: ViT -> position-aware adapter -> Qwen LLM (a transformers Qwen2 decoder).

The module knows nothing of DeepSpeed; it is plain enough to be built inside
`deepspeed.zero.Init` or on the meta device: every parameter is used through the forward of
the module that owns it (what ZeRO-3's parameter fetch relies on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.utils import ModelOutput

from qwenvl_train.model.adapter import Adapter
from qwenvl_train.model.attention import (
    hf_attn_implementation,
    llm_attention_inputs,
    positions_from_segments,
    resolve_attn_implementation,
)
from qwenvl_train.model.config import LLMConfig, QwenVLConfig
from qwenvl_train.model.loss import LMHead
from qwenvl_train.model.speed import checkpoint_layers, compile_layers
from qwenvl_train.model.vision import VisionTransformer
from qwenvl_train.tokens import EOD_ID, IGNORE_INDEX, IMG_PAD_ID


@dataclass
class QwenVLOutput(ModelOutput):
    """A ModelOutput (a dict as well) so ZeRO-3's module hooks can find the tensors in it."""

    loss: torch.Tensor | None = None  # 0-dim mean CE over label tokens
    token_loss: torch.Tensor | None = None  # [B, L] fp32 CE at label positions, 0 elsewhere
    logits: torch.Tensor | None = None  # [B, L, V], only when no labels are given


def qwen2_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> Qwen2Config:
    """Qwen-7B (v1) is a Qwen2 decoder with kv_heads = heads and QKV bias."""
    return Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        use_cache=False,
        hidden_act="silu",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=EOD_ID,
        attn_implementation=attn_implementation,
    )


class QwenVL(nn.Module):
    def __init__(self, config: QwenVLConfig, image_size: int) -> None:
        super().__init__()
        config.validate()
        if image_size % config.vision.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of "
                             f"model.vision.patch_size {config.vision.patch_size}")
        self.config = config
        self.image_size = image_size  # size of the dummy image of text-only batches
        self.num_queries = config.adapter.num_queries
        on_cuda = torch.cuda.is_available()
        # The attention backend and loss path in use (`auto` resolved for this machine).
        self.attn_implementation = resolve_attn_implementation(config.attn_implementation,
                                                               on_cuda)
        self.chunked_loss = config.uses_chunked_loss(on_cuda)
        self.vit = VisionTransformer(config.vision)
        self.adapter = Adapter(config.adapter, kv_dim=config.vision.width,
                               ln_eps=config.vision.ln_eps)
        self.llm = Qwen2ForCausalLM(
            qwen2_config(config.llm, hf_attn_implementation(self.attn_implementation)))
        # Same module, weight and name; adds the (chunked) loss path (model/loss.py).
        self.llm.lm_head.__class__ = LMHead
        checkpoint_layers(self, config.gradient_checkpointing)
        if config.compile:
            compile_layers(self)

    # ---- vision path -------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, num_queries, hidden]."""
        return self.adapter(self.vit(images))

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the `<imgpad>` slots overwritten, in order, by image features."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == IMG_PAD_ID
        num_images = 0 if images is None else int(images.shape[0])
        expected = num_images * self.num_queries
        if input_ids.device.type == "cpu":
            num_slots = int(slots.sum())
            if num_slots != expected:
                raise ValueError(
                    f"batch has {num_slots} <imgpad> tokens but {num_images} images x "
                    f"{self.num_queries} slots = {expected}")
        else:  # the same check as a device-side assertion: no host sync in the step
            torch._assert_async(slots.sum() == expected,
                                f"<imgpad> tokens != {num_images} images x {self.num_queries}")
        if num_images == 0:
            # Run the vision path anyway so every rank executes the same collectives and the
            # ViT/adapter get (zero) gradients; the contribution is multiplied by 0.
            dummy = torch.zeros(1, 3, self.image_size, self.image_size, device=embeds.device)
            return embeds + self.encode_images(dummy).sum().to(embeds.dtype) * 0
        feats = self.encode_images(images).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], feats)

    # ---- full forward -----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> QwenVLOutput:
        embeds = self.embed_inputs(input_ids, images)
        if position_ids is None:
            position_ids = (positions_from_segments(segment_ids) if segment_ids is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device)
                            .expand_as(input_ids))
        if segment_ids is None and self.attn_implementation == "flex":
            segment_ids = torch.ones_like(input_ids)  # flex needs its mask: one causal run
        # Built once per batch; every decoder layer takes the same mask / BlockMask.
        extra = llm_attention_inputs(segment_ids, self.attn_implementation, embeds.dtype)
        hidden = self.llm.model(inputs_embeds=embeds, position_ids=position_ids,
                                use_cache=False, **extra).last_hidden_state
        if labels is None:
            return QwenVLOutput(loss=None, token_loss=None, logits=self.llm.lm_head(hidden))
        return self._loss(hidden, labels, segment_ids)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor,
              segment_ids: torch.Tensor | None) -> QwenVLOutput:
        # Next-token shift: hidden[t] predicts labels[t+1]. The vocab projection (151,936
        # rows) runs only where a label exists, and never across a packed-sample boundary.
        # Finding those positions is the loss's one host sync (a nonzero).
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        if segment_ids is not None:
            valid &= segment_ids[:, 1:] == segment_ids[:, :-1]
        where = valid.nonzero(as_tuple=True)
        ce_sum, ce = self.llm.lm_head(hidden[:, :-1][where], target[where],
                                      chunked=self.chunked_loss)  # fp32
        token_loss = torch.zeros(valid.shape, dtype=ce.dtype, device=ce.device)
        token_loss = F.pad(token_loss.index_put_(where, ce), (1, 0))
        loss = ce_sum / valid.sum().clamp(min=1)
        return QwenVLOutput(loss=loss, token_loss=token_loss, logits=None)


@torch.no_grad()
def restore_fp32_tables(root: nn.Module) -> None:
    """Fixed tables back to fp32 in every QwenVL part under `root` (a QwenVL, a pipeline
    stage, a DeepSpeed engine's module): the adapter's sin-cos positions and the rotary
    inverse frequencies. `deepspeed.zero.Init` under bf16 creates them in bf16 (and older
    DeepSpeed versions cast buffers to the training dtype); both are recomputed, they are
    fixed functions of the config. Call after building and after `deepspeed.initialize`."""
    for module in root.modules():
        if isinstance(module, Adapter):
            module.fp32_pos_embed_()
        elif isinstance(module, Qwen2RotaryEmbedding) and module.inv_freq.dtype != torch.float32:
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq = inv_freq.to(module.inv_freq.device)
            module.original_inv_freq = module.inv_freq.clone()


def build_model(config: QwenVLConfig, image_size: int) -> QwenVL:
    """Build a randomly initialised model; works under `torch.device("meta")` and
    `deepspeed.zero.Init` (import this module before entering the latter)."""
    return QwenVL(config, image_size)
