"""Document masking: attention within each document of a packed window (LlamaForCausalLM.document_masking_enable).

A document ends with its EOS. `Documents` holds which document each token is in and builds, once per forward,
what attention takes: an additive (B, 1, T, T) mask for torch SDPA (one per sliding-window length), or the
cumulative sequence lengths of flash-attn's variable-length kernel (every document of the batch one sequence).
"""
from __future__ import annotations

import torch


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) int: the document of each token of a packed window, counted from 0 at its start; a document
    ends with its EOS (the EOS is its last token), so the token after an EOS starts the next one."""
    eos = (input_ids == eos_token_id).to(torch.int32)
    return torch.cumsum(eos, dim=1) - eos


def document_mask(documents: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask in ``dtype``: 0 where query i may attend key j (j <= i, both in one document,
    and within the sliding window when there is one), -inf elsewhere. Additive and in the activations' dtype, it
    is what SDPA adds to the scores as given: a bool mask would be converted to this inside every call, and
    each layer would save its own converted copy for backward (4·B·T² bytes a layer in fp32)."""
    i = torch.arange(documents.shape[1], device=documents.device)
    distance = i[:, None] - i[None, :]
    allowed = (distance >= 0) if window is None else (distance >= 0) & (distance < window)
    allowed = (allowed & (documents[:, :, None] == documents[:, None, :]))[:, None]
    # Rows padded to a multiple of 8 elements: CUDA's memory-efficient SDPA copies a mask whose strides are not
    # (a window of seq_len+1 tokens never is), in every layer, and keeps each copy for backward.
    B, T = documents.shape
    mask = torch.zeros(B, 1, T, -(-T // 8) * 8, dtype=dtype, device=documents.device)[..., :T]
    return mask.masked_fill_(~allowed, float("-inf"))  # the diagonal is always allowed: no row is all -inf


def sdpa_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes in for activations like ``x``: autocast's where it is on (q and k leave RoPE in
    fp32 under autocast, and SDPA casts q, k, v and the mask), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Documents:
    """The documents of one batch of packed windows, and what attention needs of them, shared by every layer
    (also through activation checkpointing's recomputation). ``LlamaModel`` builds what its layers will ask for
    before the first layer (`prepare`): nothing is built inside a checkpointed region, which torch.compile
    would refuse as a side effect; anything else asked for is built at its first use."""

    def __init__(self, input_ids: torch.Tensor, eos_token_id: int):
        self.ids = document_ids(input_ids, eos_token_id)  # (B, T)
        self._masks: dict[tuple, torch.Tensor] = {}
        self._varlen: tuple[torch.Tensor, int] | None = None

    def prepare(self, windows, dtype: torch.dtype, flash: bool) -> "Documents":
        """Build flash-attn's sequence lengths (``flash``), else the mask of each window length in ``dtype``."""
        if flash:
            self.varlen()
        else:
            for window in windows:
                self.mask(window, dtype)
        return self

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The SDPA mask of `document_mask` for this window and dtype."""
        key = (window, dtype)
        if key not in self._masks:
            self._masks[key] = document_mask(self.ids, window, dtype)
        return self._masks[key]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, max_seqlen) of flash-attn's varlen functions for the batch flattened to (B·T) tokens:
        cu_seqlens (int32, documents + 1) holds where each document starts and, last, B·T; a document cut by
        a window's end is a sequence of its own in each window. max_seqlen is read to the host once."""
        if self._varlen is None:
            B, T = self.ids.shape
            # The row's first document is numbered after the last one of the row before: ids unique in the batch.
            first = torch.cat([self.ids.new_zeros(1), (self.ids[:-1, -1] + 1).cumsum(0)]) if B > 1 \
                else self.ids.new_zeros(1)
            lengths = torch.unique_consecutive((self.ids + first[:, None]).flatten(), return_counts=True)[1]
            cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
            self._varlen = (cu_seqlens, int(lengths.max()))
        return self._varlen
