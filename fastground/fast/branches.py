"""Fast versions of the trainable parts of the video and audio branches.

They replace GroundingGPTModel.video_branch / audio_branch (bound per instance by
`fastground.patch`) and differ only in where the position embedding is added: inside the
key/value GEMM of the Q-Former instead of as a separate (N, T*Q, 768) tensor.
"""
from __future__ import annotations

import torch

from fastground.fast.qformer import FastQFormerBert


def fast_video_branch(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    n, t, q, h = frame_feats.shape
    if t > self.video_frame_position_embedding.num_embeddings:
        raise ValueError(f"{t} frames but the temporal position embedding has "
                         f"{self.video_frame_position_embedding.num_embeddings} rows (max_frame)")
    bert = self.video_Qformer.bert
    assert isinstance(bert, FastQFormerBert), "fast_video_branch needs a patched video_Qformer"
    key_mask = None if frame_mask is None else frame_mask.repeat_interleave(q, dim=1)
    out = bert(query_embeds=self.video_query_tokens.expand(n, -1, -1),
               encoder_hidden_states=frame_feats.reshape(n, t * q, h), encoder_attention_mask=key_mask,
               encoder_pe=self.video_frame_position_embedding.weight, rows_per_pos=q, num_pos=t)
    return self.llama_proj(out.last_hidden_state)


def fast_audio_branch(self, clip_feats: torch.Tensor, clip_mask: torch.Tensor | None = None) -> torch.Tensor:
    n, c, _ = clip_feats.shape
    bert = self.audio_Qformer.bert
    assert isinstance(bert, FastQFormerBert), "fast_audio_branch needs a patched audio_Qformer"
    out = bert(query_embeds=self.audio_query_tokens.expand(n, -1, -1), encoder_hidden_states=clip_feats,
               encoder_attention_mask=clip_mask, encoder_pe=self.audio_position_embedding.weight,
               rows_per_pos=1, num_pos=c)
    return self.audio_llama_proj(out.last_hidden_state)
