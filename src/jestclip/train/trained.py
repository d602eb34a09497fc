"""A trained model read back: the one way everything that reads a run (``jestclip eval``, the selection
diagnostics, the demo, the benchmarks) builds its model, so that none of them ignores the run's own config.

A run directory's ``config.json`` decides the model config, the contrastive loss (which decides whether the
model has a logit bias: CLIP's softmax loss has none) and the preprocessing; a bare weights file has no
config, so its model name is given and its loss is read from the weights themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jestclip.models import create_model, image_transform, tokenizer
from jestclip.train.config import TrainConfig, from_dict
from jestclip.train.rundir import RunDir

__all__ = ["TrainedModel", "WeightsSource", "find_weights", "load_trained", "weights_loss"]


@dataclass(frozen=True)
class TrainedModel:
    """A trained model and how to feed it: ``name`` (model config), ``loss`` ("sigmoid" / "softmax"),
    ``weights`` (the file read), ``transform`` (PIL image -> ``[3, H, W]``), ``tokenize`` (B captions ->
    ``[B, L]``), and the run's ``config`` (None for a bare weights file)."""

    model: nn.Module
    name: str
    loss: str
    weights: Path
    transform: Callable
    tokenize: Callable[[list[str]], torch.Tensor]
    config: TrainConfig | None = None


@dataclass(frozen=True)
class WeightsSource:
    """What ``find_weights`` found: the weights file, the model config name, the loss (None: a bare file's,
    read from the weights when loaded) and the run's config (None for a bare file)."""

    weights: Path
    name: str
    loss: str | None = None
    config: TrainConfig | None = None


def weights_loss(path: str | Path) -> str:
    """The loss a weights file (``model.pt``, a checkpoint or a bare state dict) was trained with: "sigmoid"
    when it holds a ``logit_bias`` (SigLIP), else "softmax" (CLIP has none). torch.load's own errors for a
    damaged file propagate."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # names only: nothing copied
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    keys = state.keys() if isinstance(state, dict) else ()
    return "sigmoid" if any(str(k).removeprefix("module.") == "logit_bias" for k in keys) else "softmax"


def find_weights(path: str | Path, *, model: str | None = None, loss: str | None = None) -> WeightsSource:
    """Which weights ``path`` names and what they are, reading no weights (only a run's ``config.json``).

    A run directory: its final weights, or its latest checkpoint while it trains; its config gives model and
    loss, and ``model`` / ``loss`` given as well must agree with it (a ValueError names both values: a flag
    must not silently build another model). A weights file: ``model`` is required (a ValueError without it),
    ``loss`` is None unless given. A missing path is a FileNotFoundError.
    """
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        config = from_dict(run.read_config())  # first: a directory that is no run says so
        for flag, given, own in (("--model", model, config.model), ("--loss", loss, config.method.loss)):
            if given is not None and given != own:
                raise ValueError(
                    f"{flag} {given!r} contradicts run {path}, trained with {flag[2:]} {own!r}; "
                    f"leave {flag} out"
                )
        return WeightsSource(run.weights(), config.model, config.method.loss, config)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if model is None:
        raise ValueError(f"{path} is a weights file; say which model it holds with --model")
    return WeightsSource(path, model, loss)


def load_trained(
    source: str | Path | WeightsSource,
    *,
    model: str | None = None,
    loss: str | None = None,
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """The model of a run directory or a weights file (``source`` as ``find_weights`` takes it, or what it
    returned), in eval mode on ``device``; a bare file's loss, when not given, is ``weights_loss(file)``.
    Weights that do not fit the model are a ValueError (``create_model``)."""
    if not isinstance(source, WeightsSource):
        source = find_weights(source, model=model, loss=loss)
    loss = source.loss or weights_loss(source.weights)
    built = create_model(source.name, loss=loss, checkpoint=source.weights, device=device).eval()
    return TrainedModel(
        built,
        source.name,
        loss,
        source.weights,
        image_transform(source.name),
        tokenizer(source.name),
        source.config,
    )
