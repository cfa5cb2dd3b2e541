"""MoReS: Modality Linear Representation-Steering (the paper's tuner).

At the selected positions of the output of a decoder block (the residual stream entering the next block):

    h' = dropout( h + R (W h + b − Rᵀ h) )

R ∈ R^{D×d} has orthonormal columns (a hard constraint: `torch.nn.utils.parametrizations.orthogonal` with the
householder map), W ∈ R^{d×D} and b ∈ R^d are one `nn.Linear(D, d)` with its default init (MoReS is not the
identity at step 0). Every steered layer has its own R, W, b: d(2D+1) parameters per layer. The intervention always
runs in fp32 (half-precision QR kernels do not exist); h is cast to fp32 and the result back to h's dtype. It is
immune to `torch.autocast`: autocast would otherwise run the reflector products and W·h in bf16 (R then drifts
from orthonormal by ~1e-3 and the steering changes), so both are computed with autocast switched off.

Why `use_trivialization=False`: with the default dynamic trivialization torch keeps a D×D `base` buffer per layer
that is not a parameter, so a checkpoint of the trainable parameters alone would not determine R (the bug pyreft had)
and it costs D² memory per layer. Without it, R is a pure function of the stored D×d householder reflectors, so
saving/loading `model.trainable_state_dict()` reproduces R, and the logits, bit for bit.

Positions are computed once per batch in `observe_batch` (LlavaModel calls it before the LLM runs) and the forward
hooks gather exactly those rows, transform them and scatter them back: no work on the other tokens. Decode steps of
cached generation observe an all-False image mask, so they are not steered (the steered prompt states reach the
answer through the KV cache).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from factory.errors import FactoryError
from factory.tuners.arch import hidden_size, llm_layers, module_device
from factory.tuners.base import Tuner, register_tuner
from factory.tuners.mores_positions import (
    POSITION_RULES, check_positions_rule, parse_layers, parse_positions, select_positions,
    select_positions_llava_steering,
)
from factory.tuners.options import in_range, one_of


class MoReSIntervention(nn.Module):
    """One layer's steering map h ↦ dropout(h + R(Wh + b − Rᵀh)), computed in fp32.

    `rotation_seed`: draw the initial R from its own generator with this seed instead of torch's global one. A
    frozen R (tuner.train_rotation=false) is drawn so: a checkpoint holds only trainable weights, and the rebuilt
    model must find the same R again."""

    def __init__(self, hidden: int, rank: int, dropout: float = 0.0, rotation_seed: Optional[int] = None):
        super().__init__()
        if not 1 <= rank <= hidden:
            raise FactoryError(f"tuner.rank={rank} must be between 1 and the LLM hidden size {hidden}.")
        # nn.Linear(d, D) stores a D×d weight: the columns of R. Orthogonally initialised, then constrained.
        self.rotate = nn.Linear(rank, hidden, bias=False, dtype=torch.float32)
        if not self.rotate.weight.is_meta and rotation_seed is None:
            nn.init.orthogonal_(self.rotate.weight)
        elif not self.rotate.weight.is_meta:  # drawn on the CPU: the same R on every device
            generator = torch.Generator().manual_seed(rotation_seed)
            with torch.no_grad():
                self.rotate.weight.copy_(nn.init.orthogonal_(torch.empty(self.rotate.weight.shape, device="cpu"),
                                                             generator=generator))
        orthogonal(self.rotate, "weight", orthogonal_map="householder", use_trivialization=False)
        stored = self.rotate.parametrizations.weight.original
        with torch.no_grad():  # the parametrization stores a transposed [D, d] view (stride (1, D)): make it standard
            stored.data = torch.empty(stored.shape, dtype=stored.dtype, device=stored.device).copy_(stored.data)
        self.project = nn.Linear(hidden, rank, bias=True, dtype=torch.float32)  # W, b (default init)
        self.dropout = nn.Dropout(dropout)

    def rotation(self) -> torch.Tensor:
        """R (D×d, orthonormal columns) in fp32, whatever dtype the parameters were cast to.

        The stored D×d matrix holds the householder reflectors (strictly lower part) and the column signs (its
        diagonal), as torch's parametrization wrote them at initialisation. R is computed from them by
        `householder_columns` in O(D·d²): torch's own `householder_product` backward costs O(D²·d) and made one
        MoReS layer as slow as a decoder block. The signs are read as ±1 from the diagonal's sign (weight decay or a
        bf16 cast could otherwise shrink 1.0 to 0.99…).
        """
        stored = self.rotate.parametrizations.weight.original
        with without_autocast(stored.device):
            return householder_columns(stored.float())

    @torch.no_grad()
    def load_rotation(self, rotation: torch.Tensor) -> None:
        """Make `rotation()` return the given D×d matrix (up to fp32 rounding, ~1e-7): the materialised R that other
        projects save (LLaVA-Steering's `rotate_layer`). Its QR factorisation gives the householder reflectors
        (strictly lower part) and the column signs (diagonal) that `householder_columns` reads; a column LAPACK
        leaves unreflected (tau = 0) is a reflection there, so its sign is flipped to compensate."""
        stored = self.rotate.parametrizations.weight.original
        if tuple(rotation.shape) != tuple(stored.shape):
            raise FactoryError(f"A MoReS rotation of shape {tuple(rotation.shape)} does not fit this layer's "
                               f"{tuple(stored.shape)} (hidden size × rank).")
        r = rotation.detach().to(device=stored.device, dtype=torch.float64)
        error = float((r.t() @ r - torch.eye(r.shape[1], dtype=r.dtype, device=r.device)).abs().max())
        if error > 1e-3:
            raise FactoryError(f"The MoReS rotation R to load does not have orthonormal columns (max |RᵀR − I| = "
                               f"{error:.2g}); it is not a MoReS R (check which tensor the file calls the rotation).")
        reflectors, tau = torch.geqrf(r)
        signs = torch.where(reflectors.diagonal() >= 0, 1.0, -1.0).to(r.dtype) * torch.where(tau == 0, -1.0, 1.0)
        reflectors.diagonal().copy_(signs)
        stored.copy_(reflectors.to(stored.dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with without_autocast(hidden.device):
            x = hidden.float()
            rot = self.rotation()
            weight, bias = self.project.weight.float(), self.project.bias.float()
            delta = (x @ weight.t() + bias - x @ rot) @ rot.t()
            return self.dropout(x + delta).to(hidden.dtype)


def without_autocast(device: torch.device):
    """A context in which matmuls on `device` run in their inputs' dtype (fp32 here) even inside a caller's
    `torch.autocast` region; a no-op for devices autocast does not know (meta)."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def householder_columns(stored: torch.Tensor) -> torch.Tensor:
    """Q = H_1 H_2 … H_d [:, :d] · diag(signs) for a D×d `stored` matrix, with H_i = I − τ_i v_i v_iᵀ, v_i the i-th
    column of the unit-lower-triangular part of `stored` and τ_i = 2/‖v_i‖² (LAPACK's orgqr convention, which
    torch's householder orthogonal map uses). Applying the reflections right to left to the first d columns of the
    identity costs O(D·d²) and back-propagates in the same cost."""
    rows, cols = stored.shape
    eye = torch.eye(rows, cols, dtype=stored.dtype, device=stored.device)
    reflectors = stored.tril(-1) + eye
    tau = 2.0 / (reflectors * reflectors).sum(dim=0)
    q = eye
    for i in range(cols - 1, -1, -1):
        v = reflectors[:, i : i + 1]
        q = q - tau[i] * v @ (v.t() @ q)
    signs = torch.where(stored.diagonal() >= 0, 1.0, -1.0).to(stored.dtype).detach()
    return q * signs


# Seed of the initial R of layer i when R is frozen: FROZEN_ROTATION_SEED + i (any fixed number would do).
FROZEN_ROTATION_SEED = 20240801


class MoReS(nn.Module):
    """Per-layer MoReS interventions plus the forward hooks that apply them at the observed positions."""

    def __init__(self, hidden: int, layer_ids: Sequence[int], rank: int = 1, positions: str = "f4+l5",
                 modality: str = "vision", dropout: float = 0.05, positions_rule: str = "image_span",
                 positions_offset: int = 1, train_rotation: bool = True):
        super().__init__()
        if modality not in ("vision", "text"):
            raise FactoryError(f"tuner.modality={modality!r} is not supported: use 'vision' (default) or 'text'.")
        self.layer_ids: List[int] = list(layer_ids)
        self.rank, self.modality, self.positions_spec = rank, modality, str(positions)
        self.spec = parse_positions(positions)
        check_positions_rule(positions_rule, self.spec, modality)
        self.positions_rule, self.positions_offset = positions_rule, int(positions_offset)
        self.train_rotation = bool(train_rotation)
        self.interventions = nn.ModuleDict({
            str(i): MoReSIntervention(hidden, rank, dropout, None if train_rotation else FROZEN_ROTATION_SEED + i)
            for i in self.layer_ids})
        self.positions: Optional[torch.Tensor] = None  # [B, P] of the last observed batch, -1 = padding
        self._rows: Optional[tuple] = None  # (batch index [M], position [M]) of every steered token
        self._shape: Optional[tuple] = None
        self._handles: list = []

    # ---- batch observer (called by LlavaModel before the LLM runs) -------------------------------------------
    def observe_batch(self, image_mask: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None) -> None:
        """Positions of the batch about to run (`labels` in training: modality=text skips the answer tokens)."""
        if self.positions_rule == "llava_steering":
            self.positions = select_positions_llava_steering(image_mask, self.spec, self.positions_offset)
        else:
            self.positions = select_positions(image_mask, attention_mask, self.spec, self.modality, labels)
        valid = self.positions >= 0
        self._rows = (valid.nonzero(as_tuple=True)[0], self.positions[valid])
        self._shape = tuple(image_mask.shape)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def attach(self, layers: nn.ModuleList) -> None:
        self.detach()
        for i in self.layer_ids:
            self._handles.append(layers[i].register_forward_hook(partial(self._steer_hook, str(i))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def steer(self, key: str, hidden: torch.Tensor) -> torch.Tensor:
        """Apply layer `key`'s intervention to the observed positions of hidden [B, T, D] (out of place)."""
        if self._rows is None:
            raise FactoryError(
                "MoReS ran before any batch was observed: the model must call observe_batch(image_mask, "
                "attention_mask) on its batch_observers before running the LLM (LlavaModel.forward does)."
            )
        batch_idx, pos_idx = self._rows
        if batch_idx.numel() == 0:
            return hidden
        if tuple(hidden.shape[:2]) != self._shape:
            raise FactoryError(
                f"MoReS positions were computed for a batch of shape {self._shape} but the LLM ran on "
                f"{tuple(hidden.shape[:2])}; call observe_batch with the mask of the batch actually being run."
            )
        if batch_idx.device != hidden.device:
            batch_idx, pos_idx = batch_idx.to(hidden.device), pos_idx.to(hidden.device)
            self._rows = (batch_idx, pos_idx)
        steered = self.interventions[key](hidden[batch_idx, pos_idx])
        return hidden.index_put((batch_idx, pos_idx), steered)

    def _steer_hook(self, key: str, module: nn.Module, args, output):
        if isinstance(output, tuple):
            return (self.steer(key, output[0]),) + tuple(output[1:])
        return self.steer(key, output)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, layers={self.layer_ids}, positions={self.positions_spec!r}, "
                f"modality={self.modality!r}, positions_rule={self.positions_rule!r}, "
                f"train_rotation={self.train_rotation}")

    def mark_trainable(self) -> None:
        """Everything trains, except R when train_rotation is false (then W and b alone: d(D+1) per layer)."""
        self.requires_grad_(True)
        if not self.train_rotation:
            for intervention in self.interventions.values():
                intervention.rotate.requires_grad_(False)


@dataclass(frozen=True)
class MoReSOptions:
    rank: int = 1                                  # subspace dimension d
    layers: Union[str, int, List[int]] = "all"     # all | [0, 5, 9] | every_2nd | "0-15" (mores_positions)
    positions: str = "f4+l5"                       # fN+lM | fN | lM | ratio=r | all (mores_positions)
    modality: str = "vision"                       # vision | text
    dropout: float = 0.05
    positions_rule: str = "image_span"             # image_span | llava_steering (mores_positions.POSITION_RULES)
    positions_offset: int = 1                      # llava_steering only: window start − image start
    train_rotation: bool = True                    # false: R stays at its (seeded) initial value, W and b train

    def check(self, tuner: str) -> None:
        in_range(tuner, "rank", self.rank, low=1)
        one_of(tuner, "modality", self.modality, ("vision", "text"))
        in_range(tuner, "dropout", self.dropout, low=0, high=1, high_open=True)
        one_of(tuner, "positions_rule", self.positions_rule, POSITION_RULES)
        check_positions_rule(self.positions_rule, parse_positions(self.positions), self.modality)


@register_tuner
class MoReSTuner(Tuner):
    """`tuner=mores` (MoReS-B, d=1); `mores_l` (d=2) and `mores_h` (d=4) are the same tuner with another rank."""

    name = "mores"
    Options = MoReSOptions

    def is_attached(self, model: nn.Module) -> bool:
        return isinstance(getattr(model.llm, "mores", None), MoReS)

    def attach(self, model: nn.Module) -> None:
        llm = model.llm
        layers = llm_layers(llm)
        opts = self.options
        ids = parse_layers(opts.layers, len(layers))
        with torch.device(module_device(llm)):
            mores = MoReS(hidden_size(llm), ids, rank=opts.rank, positions=opts.positions, modality=opts.modality,
                          dropout=opts.dropout, positions_rule=opts.positions_rule,
                          positions_offset=opts.positions_offset, train_rotation=opts.train_rotation)
        llm.add_module("mores", mores)  # inside the LLM: its parameters are the LLM's TP*
        mores.attach(layers)
        observers = getattr(model, "batch_observers", None)
        if observers is None:
            raise FactoryError(
                f"{type(model).__name__} has no `batch_observers` list, so MoReS cannot learn where the image tokens "
                f"are. Use factory.model.LlavaModel (it calls observe_batch before the LLM runs)."
            )
        observers.append(mores)

    def mark_trainable(self, model: nn.Module) -> None:
        model.llm.mores.mark_trainable()
