"""The resolved per-layer plan: mixer kind, attention scope, and which layer owns the K/V each layer reads.

This is where global/local placement and cross-layer KV sharing are decided (paper §2.3), from explicit lists
or from rules, and validated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .config import ConfigError, ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    index: int
    kind: str  # "hybrid" | "attention" | "ssm"
    scope: Optional[str]  # "global" | "local" | None (no attention heads)
    kv_owner: Optional[int]  # layer whose K/V this layer reads (itself when it projects its own); None: no attention
    meta_tokens: int

    @property
    def has_attention(self) -> bool:
        return self.scope is not None

    @property
    def has_ssm(self) -> bool:
        return self.kind in ("hybrid", "ssm")

    @property
    def owns_kv(self) -> bool:
        return self.has_attention and self.kv_owner == self.index


@dataclass(frozen=True)
class LayerPlan:
    layers: tuple[LayerSpec, ...]
    window: Optional[int]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerSpec:
        return self.layers[i]

    @property
    def global_layers(self) -> list[int]:
        return [s.index for s in self.layers if s.scope == "global"]

    @property
    def kv_groups(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for s in self.layers:
            if s.has_attention:
                groups.setdefault(s.kv_owner, []).append(s.index)
        return [g for g in groups.values() if len(g) > 1]

    def as_records(self) -> list[dict]:
        return [asdict(s) for s in self.layers]

    def to_table(self) -> str:
        def scope(s: LayerSpec) -> str:
            return "-" if s.scope is None else (s.scope if s.scope == "global" else f"local({self.window})")

        width = max([9] + [len(scope(s)) for s in self.layers])
        head = f"{'layer':>5}  {'mixer':<9}  {'attention':<{width}}  {'reads KV of':<11}  {'meta':>4}"
        rows = [head, "-" * len(head)]
        for s in self.layers:
            owner = "-" if s.kv_owner is None else ("self" if s.owns_kv else f"layer {s.kv_owner}")
            rows.append(f"{s.index:>5}  {s.kind:<9}  {scope(s):<{width}}  {owner:<11}  {s.meta_tokens:>4}")
        return "\n".join(rows)


def _global_indices(cfg: ModelConfig, attn_layers: list[int]) -> set[int]:
    if cfg.window is None:
        return set(attn_layers)
    rule = cfg.global_layers
    if not isinstance(rule, str):
        not_attn = sorted(set(rule) - set(attn_layers))
        if not_attn:
            raise ConfigError(f"model.global_layers: layers {not_attn} have no attention heads; "
                              f"allowed: layers with attention {attn_layers}")
        return set(rule)
    if rule == "all" or not attn_layers:
        return set(attn_layers) if rule == "all" else set()
    first, last, middle = attn_layers[0], attn_layers[-1], attn_layers[(len(attn_layers) - 1) // 2]
    return {
        "none": set(),
        "first": {first},
        "last": {last},
        "first_last": {first, last},
        "first_middle_last": {first, middle, last},
    }[rule]


def _kv_groups(cfg: ModelConfig, local_layers: list[int], global_layers: set[int]) -> list[list[int]]:
    share = cfg.kv_share
    if share is None:
        return []
    if isinstance(share, int):
        if share < 1:
            raise ConfigError(f"model.kv_share: group size must be >= 1, got {share}")
        # Rule: split each run of consecutive local layers into groups of `share`; a run's leftover layer keeps
        # its own KV. (The release pairs its layers too but puts an odd run's extra layer in a triple, [16, 17,
        # 18]: presets.HYMBA_1_5B_KV_GROUPS lists its groups.)
        groups, run = [], []
        for i in local_layers + [None]:
            if run and (i is None or i != run[-1] + 1):
                groups += [run[j:j + share] for j in range(0, len(run), share)]
                run = []
            if i is not None:
                run.append(i)
        return [g for g in groups if len(g) > 1]
    groups = [list(g) for g in share]
    seen: set[int] = set()
    attn = set(local_layers) | global_layers
    for g in groups:
        if not g or any(not isinstance(i, int) for i in g):
            raise ConfigError(f"model.kv_share: group {g} must be a non-empty list of layer indices")
        if any(i in global_layers for i in g):
            raise ConfigError(f"model.kv_share: group {g} contains global layer(s) "
                              f"{sorted(set(g) & global_layers)}; only local (sliding-window) layers may share KV; "
                              f"allowed: local attention layers {local_layers}")
        if any(i not in attn for i in g):
            raise ConfigError(f"model.kv_share: group {g} has layers without attention heads; "
                              f"allowed: local attention layers {local_layers}")
        if g != list(range(g[0], g[0] + len(g))):
            raise ConfigError(f"model.kv_share: group {g} must list consecutive layers in order")
        if seen & set(g):
            raise ConfigError(f"model.kv_share: layers {sorted(seen & set(g))} appear in more than one group")
        seen |= set(g)
    return groups


def resolve_layer_plan(cfg: ModelConfig) -> LayerPlan:
    cfg.validate()
    kinds = cfg.layer_kinds()
    attn_layers = [i for i, k in enumerate(kinds) if k == "attention" or (k == "hybrid" and cfg.n_heads > 0)]
    global_set = _global_indices(cfg, attn_layers)
    local_layers = [i for i in attn_layers if i not in global_set]
    owner = {i: i for i in attn_layers}
    for g in _kv_groups(cfg, local_layers, global_set):
        widths = {i: cfg.resolved_v_head_dim(kinds[i]) for i in g}
        if len(set(widths.values())) > 1:
            raise ConfigError(f"model.kv_share: group {g} mixes value head widths {widths} (layer: width); a consumer "
                              f"reads its producer's V, so put layers of one kind in a group (all hybrid or all "
                              f"attention) or set model.v_head_dim")
        for i in g:
            owner[i] = g[0]
    specs = []
    for i, kind in enumerate(kinds):
        has_attn = i in owner
        scope = None if not has_attn else ("global" if i in global_set else "local")
        specs.append(LayerSpec(index=i, kind=kind if has_attn or kind != "hybrid" else "ssm", scope=scope,
                               kv_owner=owner.get(i), meta_tokens=cfg.n_meta_tokens))
    return LayerPlan(layers=tuple(specs), window=cfg.window)
