"""What every trainer shares: training a subset of a model's parameters in place and giving the
model back exactly, and resumable checkpoints that load no code.

* :func:`trained_subset` -- a context manager: the named parameters train (and nothing else
  gathers gradients); on exit, also after an exception or a kill signal turned into one, every
  touched tensor is copied back bit for bit and the model is left in eval mode without gradients.
* :class:`Checkpoint` -- the exact state of a training run (tensors, the optimiser's state, every
  random generator, the step) in one safetensors file with a JSON record: resuming gives the
  same result as an uninterrupted run, a checkpoint of another config or base model is refused,
  and a planted file can only be data (no ``pickle``, no ``torch.load``).

Used by ESD, DUO, Dark Miner, relearning and concept inversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .fileio import atomic_path


@contextlib.contextmanager
def trained_subset(module: torch.nn.Module, names: Sequence[str]) -> Iterator["TrainedSubset"]:
    """Train ``names`` of ``module`` in place; restore them exactly on exit (see module docstring)."""
    params = dict(module.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"No parameter(s) {unknown[:3]} in this {type(module).__name__}.")
    subset = TrainedSubset(params, {n: params[n].detach().clone() for n in names})
    for n, p in params.items():
        p.requires_grad_(n in subset.original)
    module.train()
    try:
        yield subset
    finally:
        with torch.no_grad():
            for n, w in subset.original.items():
                params[n].copy_(w)
        for p in params.values():
            p.grad = None
        module.eval().requires_grad_(False)


class TrainedSubset:
    """The parameters being trained (``params[name]``) and their values before training."""

    def __init__(self, params: dict[str, torch.nn.Parameter], original: dict[str, torch.Tensor]):
        self.params = params
        self.original = original

    @property
    def names(self) -> list[str]:
        return list(self.original)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [self.params[n] for n in self.original]

    def delta(self) -> dict[str, torch.Tensor]:
        """``{name: trained - original}`` on the CPU."""
        return {n: (self.params[n].detach() - w).cpu() for n, w in self.original.items()}

    def values(self) -> dict[str, torch.Tensor]:
        """The trained values themselves (a checkpoint stores these: original + delta would round)."""
        return {n: self.params[n].detach().cpu().clone() for n in self.original}

    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.original:
                self.params[n].copy_(values[n].to(self.params[n]))


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (another config, another base model, unreadable)."""


class Checkpoint:
    """A resumable training state at ``path`` (safetensors + a JSON record), tied to a config
    string and a base model's content hash.

    Example::

        ck = Checkpoint(out.with_name(out.name + ".ckpt.safetensors"), config=cfg_json, base_model_hash=h)
        state = ck.load(optimizer=opt, generators={"noise": gen}, rngs={"data": rng})
        ...
        ck.save(step, tensors=..., optimizer=opt, generators={"noise": gen}, rngs={"data": rng})
    """

    def __init__(self, path: str | os.PathLike, *, config: str, base_model_hash: str):
        self.path = Path(path)
        self.config = config
        self.base_model_hash = base_model_hash

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, *, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
             generators: dict[str, torch.Generator] | None = None, rngs: dict[str, random.Random] | None = None,
             extra: dict | None = None) -> None:
        """Write the state atomically (temporary name, then rename)."""
        from safetensors.torch import save_file

        flat = {f"t.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        record: dict[str, Any] = {"step": int(step), "config": self.config, "base_model_hash": self.base_model_hash,
                                  "extra": extra or {}, "tensor_names": list(tensors)}
        if optimizer is not None:
            sd = optimizer.state_dict()
            scalars: dict[str, dict] = {}
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        flat[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars.setdefault(str(pid), {})[k] = v
            record["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars,
                                   "state_ids": [str(p) for p in sd["state"]]}
        for name, g in (generators or {}).items():
            flat[f"gen.{name}"] = g.get_state()
        record["rngs"] = {name: _py_state(r.getstate()) for name, r in (rngs or {}).items()}

        with atomic_path(self.path, overwrite=True) as tmp:  # the checkpoint is replaced at every save
            save_file(flat, str(tmp), metadata={"safediff-checkpoint": json.dumps(record, default=str)})

    def load(self, *, optimizer: torch.optim.Optimizer | None = None,
             generators: dict[str, torch.Generator] | None = None,
             rngs: dict[str, random.Random] | None = None) -> dict | None:
        """Restore the optimiser and random states in place; return ``{"step", "tensors",
        "extra"}``, or None when there is no checkpoint."""
        if not self.path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                flat = {k: f.get_tensor(k) for k in f.keys()}
            record = json.loads(meta["safediff-checkpoint"])
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise CheckpointError(f"The checkpoint {self.path} is unreadable ({type(e).__name__}: {e}); delete it "
                                  "to start over.") from None
        if record.get("config") != self.config or record.get("base_model_hash") != self.base_model_hash:
            raise CheckpointError(f"{self.path} was made with another config or base model; delete it, or train with "
                                  "the same settings to resume.")
        if optimizer is not None and "optimizer" in record:
            o = record["optimizer"]
            state = {}
            for pid in o["state_ids"]:
                st = {k[len(f"opt.{pid}."):]: v for k, v in flat.items() if k.startswith(f"opt.{pid}.")}
                st.update(o["scalars"].get(pid, {}))
                state[int(pid)] = st
            optimizer.load_state_dict({"state": state, "param_groups": o["param_groups"]})
        for name, g in (generators or {}).items():
            g.set_state(flat[f"gen.{name}"])
        for name, r in (rngs or {}).items():
            r.setstate(_py_state_back(record["rngs"][name]))
        return {"step": record["step"], "tensors": {k: flat[f"t.{k}"] for k in record["tensor_names"]},
                "extra": record.get("extra", {})}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _py_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_back(state) -> tuple:
    return (state[0], tuple(state[1]), state[2])
