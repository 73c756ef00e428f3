"""The parameter table of the seed notes: every named parameter, its shape and count, in groups."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch.nn as nn

# (pattern on the parameter name, group name); the first match wins. N is the block's number.
_GROUPS = [
    (r"token_embedding_table\.|position_embedding_table\.", "embeddings"),
    (r"blocks\.(\d+)\.sa\.qkv\.", "block {N} attention q/k/v"),
    (r"blocks\.(\d+)\.sa\.proj\.", "block {N} attention proj"),
    (r"blocks\.(\d+)\.ffwd\.", "block {N} feed-forward"),
    (r"blocks\.(\d+)\.ln[12]\.", "block {N} layer norms"),
    (r"ln_f\.", "ln_f"),
    (r"lm_head\.", "lm_head"),
]


@dataclass(frozen=True)
class ParamRow:
    name: str
    shape: tuple[int, ...]
    count: int
    group: str


@dataclass(frozen=True)
class ParamTable:
    rows: list[ParamRow]

    @property
    def total(self) -> int:
        return sum(r.count for r in self.rows)

    def group_totals(self) -> dict[str, int]:
        """Subtotals in the order the groups first appear (embeddings, block 0 ..., lm_head)."""
        totals: dict[str, int] = {}
        for row in self.rows:
            totals[row.group] = totals.get(row.group, 0) + row.count
        return totals

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "groups": self.group_totals(),
            "total": self.total,
        }

    def format(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'parameter':<{width}}  {'shape':<14} {'count':>12}"]
        current = None
        for row in self.rows:
            if row.group != current:
                current = row.group
                lines.append(f"# {current}")
            shape = "[" + ", ".join(map(str, row.shape)) + "]"
            lines.append(f"{row.name:<{width}}  {shape:<14} {row.count:>12,}")
        lines.append("")
        lines.append("subtotals")
        for group, count in self.group_totals().items():
            lines.append(f"  {group:<{width}} {count:>12,}")
        lines.append(f"total {self.total:,} parameters ({self.total / 1e6:.6f} M)")
        return "\n".join(lines)


def _group_of(name: str) -> str:
    for pattern, group in _GROUPS:
        match = re.match(pattern, name)
        if match:
            return group.format(N=match.group(1)) if "{N}" in group else group
    return "other"


def parameter_table(model: nn.Module) -> ParamTable:
    rows = [
        ParamRow(name, tuple(p.shape), p.numel(), _group_of(name))
        for name, p in model.named_parameters()
    ]
    return ParamTable(rows)


def group_subtotals_flat(table: ParamTable) -> dict[str, int]:
    """Subtotals summed over blocks (attention q/k/v, proj, ...), handy as MLflow params."""
    flat: dict[str, int] = {}
    for group, count in table.group_totals().items():
        key = re.sub(r"^block \d+ ", "blocks ", group).replace("/", "").replace(" ", "_")
        flat[key] = flat.get(key, 0) + count
    return flat
