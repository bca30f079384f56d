"""Memory per sequence, KVBuffer vs recurrent decoding (docs/operations.md, "Capacity planning").

The server's own figures (GetServerInfo capacity estimates) are authoritative: they come from the
pools it allocated. This module is the same formula for planning before a server exists.
"""
from __future__ import annotations

from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Layout:
    num_layers: int          # L
    num_k_heads: int         # H
    num_v_heads: int         # HV
    head_k_dim: int          # K
    head_v_dim: int          # V
    conv_width: int = 4      # W
    flush_interval: int = 16     # C
    stateless_limit: int = 64
    max_drafts: int = 16
    page_tokens: int = 16
    buffer_bytes: int = 4    # element size of k^ and u rows (fp32 4, bf16 2)
    conv_bytes: int = 4      # element size of raw qkv rows in conv windows
    state_bytes: int = 4     # fp32 states

    @property
    def channels(self) -> int:
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim

    @property
    def state_slot(self) -> int:
        """L*HV*K*V*4: one sequence's states on every layer."""
        return self.num_layers * self.num_v_heads * self.head_k_dim * self.head_v_dim * self.state_bytes

    @property
    def buffer_row(self) -> int:
        """(H*K + HV*V)*dtype + HV*4: one buffered token of one layer (k^, u and G)."""
        return ((self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim)
                * self.buffer_bytes + self.num_v_heads * 4)

    @property
    def buffer_page(self) -> int:
        """page_tokens rows on every layer."""
        return self.page_tokens * self.num_layers * self.buffer_row

    @property
    def conv_slot(self) -> int:
        """L*(W-1+max_drafts)*channels*dtype: the conv window plus tentative draft rows."""
        return self.num_layers * (self.conv_width - 1 + self.max_drafts) * self.channels * self.conv_bytes

    @property
    def recurrent_conv(self) -> int:
        return self.num_layers * (self.conv_width - 1) * self.channels * self.conv_bytes

    def has_state(self, length: int, drafts: int = 0) -> bool:
        """A state is allocated at the first fold: once length + drafts exceed the stateless limit."""
        return length + drafts > self.stateless_limit

    def buffer_rows(self, length: int, drafts: int = 0) -> int:
        """Most rows a sequence of `length` committed tokens holds while verifying `drafts`."""
        if not self.has_state(length, drafts):
            return length + drafts
        return self.flush_interval  # the fold rule: n + m <= C, with m <= max_drafts <= C

    def kvbuffer_bytes(self, length: int, drafts: int = 0) -> int:
        pages = _ceil_div(self.buffer_rows(length, drafts), self.page_tokens)
        state = self.state_slot if self.has_state(length, drafts) else 0
        return state + pages * self.buffer_page + self.conv_slot

    def recurrent_bytes(self, length: int, drafts: int = 0) -> int:
        """(1 + drafts) x (state + conv window): recurrent verification keeps a state per draft."""
        return (1 + drafts) * (self.state_slot + self.recurrent_conv)

    @classmethod
    def from_server_info(cls, info) -> "Layout":
        m, b = info.model, info.buffer
        size = {1: 4, 2: 2, 3: 2}
        return cls(num_layers=m.num_layers, num_k_heads=m.num_k_heads, num_v_heads=m.num_v_heads,
                   head_k_dim=m.head_k_dim, head_v_dim=m.head_v_dim, conv_width=m.conv_width,
                   flush_interval=b.flush_interval, stateless_limit=b.stateless_limit,
                   max_drafts=b.max_drafts, page_tokens=b.page_tokens,
                   buffer_bytes=size.get(b.buffer_dtype, 4), conv_bytes=size.get(b.conv_dtype, 4),
                   state_bytes=size.get(b.state_dtype, 4))
