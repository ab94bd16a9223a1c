"""LoRA adapters through ``peft`` on a model's ``nn.Linear`` layers: a train phase's ``lora:``.

``add_lora`` injects a low-rank adapter beside every Linear layer whose dotted name matches one of
``target_modules`` (globs, e.g. ``blocks.*.attn.q``); each pattern must match at least one Linear layer,
and a Linear that a parent module bypasses (the output projection inside ``nn.MultiheadAttention``, whose
forward reads its weight directly) is refused: an adapter there would train nothing. The phase then
trains the adapters only, or everything with ``train_all``.

PyTorch's fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` (eval mode, no grad)
reads the Linear layers' base weights directly and skips their adapters; ``add_lora`` turns that fast
path off for the process when the model holds such a layer, so an unmerged adapter is heard at eval.

A finished LoRA phase writes its weights twice: ``model.pt``, the adapters merged into the base weights
under the base model's own names (what later phases, ``raytrain infer`` and exports load), and
``adapter.pt`` (``adapter_file``): the adapter tensors, the LoRA settings and the base weights' path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

ADAPTER_FILE = "adapter.pt"
ADAPTER_NAME = "default"  # peft's name of the one adapter


class LoraError(ValueError):
    """A LoRA setting that cannot apply to this model; the message names the key and the fix."""


def _spec(spec: Any) -> dict[str, Any]:
    return spec if isinstance(spec, dict) else spec.model_dump()


def target_names(model: nn.Module, patterns: list[str], where: str = "lora") -> list[str]:
    """The dotted names of the Linear layers ``patterns`` (globs) match; each pattern must match one."""
    modules = {n: m for n, m in model.named_modules() if n}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    bypassed = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    names: list[str] = []
    for pat in patterns:
        hit = [n for n in linears if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            other = [n for n in modules if fnmatch.fnmatchcase(n, pat)]
            if other:
                kinds = sorted({type(modules[n]).__name__ for n in other})
                raise LoraError(f"{where}.target_modules: {pat!r} matches {', '.join(other[:3])} ({', '.join(kinds)}), "
                                "not Linear layers: LoRA here adapts nn.Linear only")
            some = ", ".join(linears[:6])
            raise LoraError(f"{where}.target_modules: {pat!r} matches no Linear layer of the model; its Linear "
                            f"layers are e.g. {some} (globs: * ? [..])")
        for n in hit:
            if n in bypassed:
                raise LoraError(f"{where}.target_modules: {n} is the output projection of an nn.MultiheadAttention, "
                                "whose forward reads its weight directly: an adapter there would train nothing. "
                                "Leave it out, or build the attention from nn.Linear projections")
            if n not in names:
                names.append(n)
    return names


def add_lora(model: nn.Module, spec: Any, where: str = "lora") -> nn.Module:
    """Inject the adapters (in place; returns ``model``). ``spec``: rank, alpha, dropout, target_modules."""
    from peft import LoraConfig, inject_adapter_in_model

    s = _spec(spec)
    names = target_names(model, list(s["target_modules"]), where)
    config = LoraConfig(r=int(s["rank"]), lora_alpha=int(s["alpha"]), lora_dropout=float(s["dropout"]),
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if any(isinstance(m, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer | nn.MultiheadAttention)
           for m in model.modules()):
        torch.backends.mha.set_fastpath_enabled(False)  # else eval skips the adapters (module docstring)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def is_lora_key(key: str) -> bool:
    return ".lora_" in key or key.startswith("lora_")


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's outputs: every adapter off inside the block, back on after it."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)  # type: ignore[operator]
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)  # type: ignore[operator]


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the base layer back in its place (in place)."""
    for name, m in list(lora_layers(model)):
        m.merge()  # type: ignore[operator]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())  # type: ignore[operator]
    return model


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_lora_key(k)}


def merged_state(model: nn.Module, spec: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain state dict (base names) of ``state``, a LoRA phase's weights, merged. ``model``: a fresh
    instance of the phase's model without adapters (its weights are replaced)."""
    add_lora(model, spec)
    model.load_state_dict(state)
    return {k: v.detach().clone() for k, v in merge_lora(model).state_dict().items()}


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a LoRA state dict under the base model's names (adapters left out, unmerged)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_lora_key(k)}


def adapter_file(state: dict[str, torch.Tensor], spec: Any, base: str) -> dict[str, Any]:
    """What ``adapter.pt`` holds: ``lora`` (the settings), ``base`` (the path of the base weights the phase
    started from), ``weights`` (the adapter tensors) and, with ``train_all`` (the base weights trained too),
    ``base_weights``: the phase's own base weights, which the adapter needs."""
    s = _spec(spec)
    out: dict[str, Any] = {"lora": {k: s[k] for k in ("rank", "alpha", "dropout", "target_modules")},
                           "base": str(base), "weights": adapter_state(state)}
    if s.get("train_all"):
        out["base_weights"] = base_state(state)
    return out


def load_adapter(model: nn.Module, adapter: dict[str, Any], base: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``model`` (fresh, no adapters) with the base weights (``adapter["base_weights"]``, else ``base``) and the
    adapter of an ``adapter.pt`` (``adapter_file``) loaded, unmerged (``adapters_disabled`` gives the base)."""
    weights = adapter.get("base_weights", base)
    if weights is None:
        raise LoraError(f"the adapter needs its base weights: load {adapter.get('base') or 'the base model.pt'}")
    model.load_state_dict(weights)
    add_lora(model, adapter["lora"])
    missing, unexpected = model.load_state_dict(adapter["weights"], strict=False)
    lora_missing = [k for k in missing if is_lora_key(k)]
    if lora_missing or unexpected:
        raise LoraError(f"the adapter does not fit the model: missing {lora_missing[:3]}, unexpected {unexpected[:3]}")
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters, other parameters)."""
    lora = sum(p.numel() for n, p in model.named_parameters() if is_lora_key(n))
    return lora, sum(p.numel() for p in model.parameters()) - lora
