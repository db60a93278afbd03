"""Gates-only files: a small adapter applied on top of a base model (PEFT style).

The file holds the gate tensors plus every other tensor that differs from the base
(a new head, BN statistics, base weights changed by a full fine-tuning stage), and
gct-surgery metadata with ``kind = "gates-only"``. ``base_hash`` fingerprints the
base weights: applying the file to any other base would silently give a different
model, so ``apply_adapter`` refuses it.

The base is a model the user has, not the checkpoint's random init: ``resolve_base``
takes a SOURCE or falls back to the weights recorded when the model was first opened.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import torch
from torch import nn

from ..core.surgery import gated_modules, is_gate_parameter
from ..errors import CheckpointError
from .checkpoint import (base_state, is_checkpoint, load_checkpoint, read_metadata, rebuild,
                         stored_tensors)
from .metadata import METADATA_KEY, CheckpointMeta
from .sources import ModelSource, build_model, parse_source, resolve_hub
from .state_dicts import load_weights, require_file, unshared
from .trust import require

HASH_PREFIX = "sha256:"


def base_hash(state: dict) -> str:
    """sha256 over the base tensors in name order: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, not a copy of them
    return HASH_PREFIX + h.hexdigest()


def _open_event(meta: CheckpointMeta) -> dict:
    return next((e for e in meta.history if e.get("action") == "open"), {})


def recorded_base(meta: CheckpointMeta) -> ModelSource:
    """The base the checkpoint was first opened from, as a buildable source.

    A timm/torchvision model opened without weights was a random init, which cannot
    be rebuilt: the user has to name the base.
    """
    event = _open_event(meta)
    spec = event.get("source") or meta.source["spec"]  # both validated by read_metadata
    weights, pretrained = event.get("weights"), bool(event.get("pretrained"))
    if parse_source(spec)[0] in ("timm", "torchvision") and not weights and not pretrained:
        raise CheckpointError(
            f"the checkpoint's base is {spec} with random initial weights, which cannot be "
            "rebuilt; pass --base SOURCE naming the base weights (e.g. a .safetensors file)")
    return ModelSource(spec, dict(meta.source.get("kwargs") or {}), weights=weights,
                       pretrained=pretrained, use_ema=bool(event.get("use_ema")),
                       root=meta.source.get("root"))


def resolve_base(meta: CheckpointMeta, base: str | os.PathLike | nn.Module | None = None, *,
                 allow_pickle: bool = False, named_by: str = "the gates-only file"
                 ) -> tuple[nn.Module, str]:
    """The base model and a description of it, from a module, a SOURCE or the record.

    A plain state-dict file is read as weights for the checkpoint's architecture, so
    ``--base resnet50.safetensors`` works without ``--arch``. ``allow_pickle`` applies
    to a ``base`` the user typed, never to a path the file records.
    """
    if isinstance(base, nn.Module):
        return base, "the given base model"
    if base is None:  # the file names its base: its code needs consent, its weights are data
        source = resolve_hub(recorded_base(meta), named_by)  # a local-dir: folder, offline
        allow_pickle = source.kind == "pickle"  # a recorded pickle: after the consent below
        if allow_pickle:  # the consented pickle holds its weights
            source = replace(source, weights=None)
        where = str(source.weights or source.spec)
    else:
        where, kwargs = str(base), dict(meta.source.get("kwargs") or {})
        if parse_source(where)[0] != "file":
            return build_model(ModelSource(where, kwargs), allow_pickle=allow_pickle), where
        require_file(where)
        if is_checkpoint(where):  # a whole model (a gates-only one is refused)
            return load_checkpoint(where).model, where
        arch = _open_event(meta).get("source") or meta.source.get("spec")
        source = ModelSource(arch, kwargs, weights=where)  # weights for the recorded architecture
    require(source.spec, root=meta.source.get("root"), named_by=named_by, what="base model code")
    return build_model(source, allow_pickle=allow_pickle), where


def save_adapter(model: nn.Module, meta: CheckpointMeta, base: nn.Module, path: str | os.PathLike,
                 *, base_name: str) -> CheckpointMeta:
    """Write the gates-only file for ``model`` relative to ``base`` (the caller's atomic
    write holds ``path``); returns its metadata. A tied tensor is written once per name:
    safetensors refuses shared storage, and an adapter is small."""
    from safetensors.torch import save_file

    same = base_state(base)  # every gate tensor, and every other one the base lacks or differs in
    tensors = unshared({
        k: v for k, v in model.state_dict().items()
        if not (k in same and same[k].dtype == v.dtype and torch.equal(same[k], v))})
    changed = sorted(k for k in tensors if not is_gate_parameter(k))
    out = replace(meta, kind="gates-only", gated=list(gated_modules(model)), aliases={},
                  base_hash=base_hash(same))
    out = out.with_event("export-gates-only", base=base_name, base_hash=out.base_hash,
                         changed_base_tensors=changed)
    save_file(tensors, str(path), metadata={METADATA_KEY: out.to_json()})
    return out


def apply_adapter(gates: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None, *,
                  allow_pickle: bool = False) -> nn.Module:
    """Rebuild the gated model from its base and a gates-only file (in eval mode).

    Refuses a base whose weights hash differs from the one the file was made from.
    The base is not modified.
    """
    meta = read_metadata(gates)
    if meta.kind != "gates-only":
        raise CheckpointError(f"{gates} is a full checkpoint, not a gates-only file; load it "
                              "with load(path)")
    base_model, base_name = resolve_base(meta, base, allow_pickle=allow_pickle, named_by=str(gates))
    state = base_state(base_model)
    found = base_hash(state)
    if found != meta.base_hash:
        made_for = next((e.get("base") for e in reversed(meta.history)
                         if e.get("action") == "export-gates-only"), "another base")
        raise CheckpointError(
            f"{base_name} is not the base {gates} was made for ({made_for}): base weights hash "
            f"{found.removeprefix(HASH_PREFIX)[:12]}, expected "
            f"{str(meta.base_hash).removeprefix(HASH_PREFIX)[:12]}; "
            "pass the weights it was exported from as the base")
    model = rebuild(meta, named_by=str(gates))
    tensors = stored_tensors(gates, meta)
    expected = model.state_dict()
    merged = {k: v for k, v in state.items()
              if k in expected and k not in tensors and v.shape == expected[k].shape}
    merged.update(tensors)
    load_weights(model, merged, what=f"{base_name} + {gates}", allow_missing_gates=False)
    return model.eval()
