"""Typed, validated description of a model: one flat dataclass so Hydra overrides read `model.<key>=...`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Union

LayerKind = str  # "hybrid" | "attention" | "ssm"
LAYER_KINDS = ("hybrid", "attention", "ssm")
LAYER_PATTERNS = ("hybrid", "attention", "ssm", "sequential")
GLOBAL_RULES = ("all", "none", "first", "last", "first_last", "first_middle_last")
SSM_KINDS = ("mamba1", "mamba2")
FUSIONS = ("mean", "concat")


class ConfigError(ValueError):
    """An impossible config value; the message names its key (`model.<key>`, or the run's, as `optim.lr`) and what is
    allowed."""


class MissingInputError(ConfigError, FileNotFoundError):
    """A file or folder that a config key names does not exist."""


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 259
    d_model: int = 64
    n_layers: int = 4
    # Per-layer mixer: a pattern name, or an explicit list of "hybrid" | "attention" | "ssm" (one per layer).
    # "sequential" alternates ssm, attention, ... (Table 1 row A, Samba-like stacking).
    layers: Union[str, list] = "hybrid"
    # attention heads
    n_heads: int = 4
    n_kv_heads: int = 2
    qk_head_dim: int = 16
    v_head_dim: Union[int, None] = None  # None: hybrid+mean layers use ssm_inner // n_heads, others qk_head_dim
    rope_theta: float = 10000.0
    window: Union[int, None] = None  # sliding window (tokens, self included); None: every attention layer is global
    global_layers: Union[str, list] = "first_middle_last"  # only read when window is set
    kv_share: Union[int, list, None] = None  # N: groups of N consecutive local layers; or explicit [[1,2],[3,4],...]
    # SSM heads
    ssm: str = "mamba1"
    ssm_inner: Union[int, None] = None  # None: ssm_expand * d_model
    ssm_expand: int = 2
    d_state: int = 16
    d_conv: int = 4
    dt_rank: Union[int, str] = "auto"  # "auto": ceil(d_model / 16), as Mamba
    dt_bc_norm: bool = False  # RMSNorm on dt, B, C (the released Hymba does this)
    ssm_head_dim: int = 16  # Mamba-2 head width
    ssm_groups: int = 1  # Mamba-2 B/C groups
    ssm_chunk_size: int = 64
    # fusion, meta tokens, FFN, misc
    fusion: str = "mean"
    n_meta_tokens: int = 0
    ffn_dim: int = 0  # 0: no FFN (pure Mamba style)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 2048  # longest token sequence (meta tokens excluded) the model accepts
    init_std: float = 0.02
    # Hold the total parameter count at this budget by re-solving ssm_inner (Table 9 rows 1-4 ratio knob).
    param_budget: Union[int, None] = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {', '.join('model.' + k for k in unknown)}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def resolved_ssm_inner(self) -> int:
        return self.ssm_inner if self.ssm_inner is not None else self.ssm_expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def resolved_v_head_dim(self, kind: LayerKind) -> int:
        if self.v_head_dim is not None:
            return self.v_head_dim
        if kind == "hybrid" and self.fusion == "mean" and self.n_heads > 0:
            return self.resolved_ssm_inner // self.n_heads
        return self.qk_head_dim

    @property
    def ssm_n_heads(self) -> int:
        return self.resolved_ssm_inner // self.ssm_head_dim

    def layer_kinds(self) -> list[LayerKind]:
        if isinstance(self.layers, str):
            if self.layers == "sequential":
                return ["ssm" if i % 2 == 0 else "attention" for i in range(self.n_layers)]
            return [self.layers] * self.n_layers
        return list(self.layers)

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for f in dataclasses.fields(self):  # a str where a size belongs would fail below in Python's words
            if f.type in _SIMPLE_TYPES:
                is_type, description = _SIMPLE_TYPES[f.type]
                need(is_type(getattr(self, f.name)), f.name, f"must be {description}, got {getattr(self, f.name)!r}")
        need(self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")
        need(self.d_model > 0, "d_model", f"must be > 0, got {self.d_model}")
        need(self.n_layers > 0, "n_layers", f"must be > 0, got {self.n_layers}")
        for key in ("rope_theta", "norm_eps", "init_std"):  # a base, a divisor guard, a standard deviation
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        if isinstance(self.layers, str):
            need(self.layers in LAYER_PATTERNS, "layers",
                 f"unknown pattern {self.layers!r}; allowed: {', '.join(LAYER_PATTERNS)} or a list of {LAYER_KINDS}")
        else:
            need(len(self.layers) == self.n_layers, "layers",
                 f"lists {len(self.layers)} layers but model.n_layers={self.n_layers}")
            bad = sorted({str(k) for k in self.layers if k not in LAYER_KINDS})
            need(not bad, "layers", f"unknown layer kind(s) {bad}; allowed: {', '.join(LAYER_KINDS)}")
        kinds = self.layer_kinds()
        uses_attn = any(k in ("hybrid", "attention") for k in kinds)
        uses_ssm = any(k in ("hybrid", "ssm") for k in kinds)
        need(self.n_heads >= 0, "n_heads", f"must be >= 0, got {self.n_heads}")
        need(self.v_head_dim is None or self.v_head_dim >= 1, "v_head_dim",
             f"must be an int >= 1 or null (derived from the fusion), got {self.v_head_dim!r}")
        if "attention" in kinds:
            need(self.n_heads > 0, "n_heads", "attention layers need n_heads >= 1")
        if uses_attn and self.n_heads > 0:
            need(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                 f"must divide model.n_heads={self.n_heads} (grouped-query attention), got {self.n_kv_heads}")
            need(self.qk_head_dim > 0 and self.qk_head_dim % 2 == 0, "qk_head_dim",
                 f"must be a positive even number (RoPE rotates pairs), got {self.qk_head_dim}")
            if "hybrid" in kinds and self.fusion == "mean" and self.v_head_dim is None:
                need(self.resolved_ssm_inner % self.n_heads == 0, "n_heads",
                     f"must divide the SSM inner width {self.resolved_ssm_inner} so mean fusion can add the branches "
                     f"(or set model.v_head_dim and model.ssm_inner with n_heads*v_head_dim == ssm_inner)")
            if "hybrid" in kinds and self.fusion == "mean":
                need(self.n_heads * self.resolved_v_head_dim("hybrid") == self.resolved_ssm_inner, "v_head_dim",
                     f"mean fusion needs n_heads*v_head_dim == ssm_inner "
                     f"({self.n_heads}*{self.resolved_v_head_dim('hybrid')} != {self.resolved_ssm_inner})")
        if uses_ssm:
            need(self.ssm in SSM_KINDS, "ssm", f"unknown SSM kind {self.ssm!r}; allowed: {', '.join(SSM_KINDS)}")
            need(self.resolved_ssm_inner > 0, "ssm_inner",
                 f"the head ratio leaves no SSM width (ssm_inner={self.resolved_ssm_inner}); lower model.n_heads "
                 f"or raise model.param_budget")
            need(self.d_state > 0, "d_state", f"must be > 0, got {self.d_state}")
            need(self.d_conv >= 2, "d_conv", f"must be >= 2, got {self.d_conv}")
            need(self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0), "dt_rank",
                 f"must be 'auto' or a positive int, got {self.dt_rank!r}")
            if self.ssm == "mamba2":
                for key in ("ssm_head_dim", "ssm_groups", "ssm_chunk_size"):
                    need(getattr(self, key) >= 1, key,
                         f"must be an int >= 1, got {getattr(self, key)!r}")
                need(self.resolved_ssm_inner % self.ssm_head_dim == 0, "ssm_head_dim",
                     f"must divide ssm_inner={self.resolved_ssm_inner}, got {self.ssm_head_dim}")
                need(self.ssm_n_heads % self.ssm_groups == 0, "ssm_groups",
                     f"must divide the number of Mamba-2 heads {self.ssm_n_heads}, got {self.ssm_groups}")
        need(self.fusion in FUSIONS, "fusion", f"unknown fusion {self.fusion!r}; allowed: {', '.join(FUSIONS)}")
        need(self.n_meta_tokens >= 0, "n_meta_tokens", f"must be >= 0 (0 turns meta tokens off), got {self.n_meta_tokens}")
        need(self.ffn_dim >= 0, "ffn_dim", f"must be >= 0 (0: no FFN), got {self.ffn_dim}")
        need(self.max_seq_len > 0, "max_seq_len", f"must be > 0, got {self.max_seq_len}")
        if self.window is not None:
            need(self.window >= 1, "window",
                 f"must be an int >= 1 or null (all global), got {self.window!r}")
        if self.kv_share is not None:
            need(self.window is not None, "kv_share",
                 "KV is shared between sliding-window layers only, and model.window is null (every layer global); "
                 "set model.window or model.kv_share=null")
            need(_is_int(self.kv_share) or (isinstance(self.kv_share, (list, tuple))
                                            and all(isinstance(g, (list, tuple)) for g in self.kv_share)),
                 "kv_share", f"must be a group size (int) or a list of layer groups like [[1, 2], [3, 4]], "
                             f"got {self.kv_share!r}")
        if isinstance(self.global_layers, str):
            need(self.global_layers in GLOBAL_RULES, "global_layers",
                 f"unknown rule {self.global_layers!r}; allowed: {', '.join(GLOBAL_RULES)} or a list of layer indices")
        else:
            bad = [i for i in self.global_layers if not (isinstance(i, int) and 0 <= i < self.n_layers)]
            need(not bad, "global_layers", f"layer indices {bad} out of range; allowed: 0..{self.n_layers - 1}")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true/false are not sizes


# The fields' annotations (strings under `from __future__ import annotations`) checked by type in validate; the
# unions of a list or a rule name with a number have checks of their own.
_SIMPLE_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an int"),
    "Union[int, None]": (lambda v: v is None or _is_int(v), "an int or null"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}

