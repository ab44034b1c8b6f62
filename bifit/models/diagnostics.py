"""Intermediate outputs of a model's named submodules, captured with forward hooks.

    with capture(model, ["resizer", "vl_interaction.vision_to_text", "vl_interaction.sentence_pool"]) as seen:
        model(...)
    seen["vl_interaction.vision_to_text"][-1]  # the fused text after the last feature level, [l, b, c]

Useful names in `BIFIT`: `resizer` (text features [b, l, c]; called a second time for the encoder's
pooled sentence when that is the sentence source), `vl_interaction.vision_to_text` / `.text_to_vision`
(fused text [l, b, c] / fused visual tokens [(t h w), b, c], one call per feature level),
`vl_interaction.sentence_pool` (sentence [b, c]), `transformer` (dict of its outputs), `pixel_decoder`
(mask features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def capture(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, list]]:
    """Within the block, every output of each named submodule is appended to `captured[name]`, one
    entry per call (a module shared by the feature levels gives one entry per level). Outputs are kept
    as returned, graph included; the hooks are removed on exit."""
    captured: dict[str, list] = {name: [] for name in names}
    handles = []
    try:
        for name in captured:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda _module, _args, output, name=name: captured[name].append(output)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
