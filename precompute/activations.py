"""Compute side of the activation pass: model forward with a hook that reduces one layer on the device.

Only small tensors come back to the host: per tile the pooled embedding (C,), the model outputs,
and either a seeded sample of raw cell vectors (calibration pass) or the per-cell NNLS weights
against the concepts H (full pass, (h, w, K) per tile). A "cell" is one spatial position of the
hooked layer; it covers tile_px / h model px of the tile.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cells import CellLayout, detect_layout, to_grid
from .concepts import Concepts
from .intervention import Intervention
from .model_outputs import outputs_2d as _outputs_2d, target_torch
from .models import ModelSpec, normalise_on_device
from .nmf import NNLS_SWEEPS, nnls_rows
from .tile_stream import SlideEnd, SlideFailed, SlidePlan, TileBatch, TileStream
from .workers import worker_init


class _StopForward(Exception):
    """Raised by the hook in calibration: nothing after the hooked layer is needed."""


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision the model runs in on `device` (bf16, else fp16 on CUDA), None for fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def compute_signature(device: torch.device) -> str:
    """Device type and precision, e.g. 'cpu-fp32' or 'cuda-bf16': part of every part file's key, because
    a layer's activations differ between devices and precisions and must not be mixed in one atlas."""
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"{device.type}-{names[autocast_dtype(device)]}"


def outputs_match(ref: torch.Tensor, alt: torch.Tensor, rel_tol: float) -> bool:
    """Same shape, finite, and max |ref - alt| <= rel_tol * max(1, max |ref|)."""
    ref, alt = ref.float(), alt.float()
    if ref.shape != alt.shape or not bool(torch.isfinite(alt).all()):
        return False
    return float((ref - alt).abs().max()) <= rel_tol * max(1.0, float(ref.abs().max()))


def prefer_channels_last(model: torch.nn.Module, x: torch.Tensor, rel_tol: float = 1e-3) -> bool:
    """Dry run of one real batch x (N, 3, H, W) in both memory layouts. True (model left channels_last)
    only when the channels_last run succeeds and gives the same outputs as the model's own contiguous
    layout; else the model is put back in contiguous format and False is returned. A model whose
    forward calls `.view` on a non-contiguous tensor fails the channels_last run and stays NCHW."""
    ref = _outputs_2d(model(x.contiguous()))
    try:
        model.to(memory_format=torch.channels_last)
        same = outputs_match(ref, _outputs_2d(model(x.contiguous(memory_format=torch.channels_last))), rel_tol)
    except RuntimeError:
        same = False
    if not same:
        model.to(memory_format=torch.contiguous_format)
    return same


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible. Use --device cpu or auto.")
    return dev


class LayerProbe:
    """Forward hook on one module. Per call it leaves its reductions in `self.out` (device tensors)."""

    def __init__(self, module: torch.nn.Module, *, relu: bool, concepts: Concepts | None,
                 device: torch.device, calib_cells: int = 0, nnls_iter: int = NNLS_SWEEPS,
                 model: torch.nn.Module | None = None):
        self.relu = relu
        self.model = model  # the whole network: how many class/register tokens a ViT layer carries
        self.layout: CellLayout | None = None  # set from the first output seen
        self.calib_cells = calib_cells
        self.nnls_iter = nnls_iter
        self.cell_index: torch.Tensor | None = None  # (B, m) cells to sample, set before each calibration batch
        self.H = self.shift = self.scale = None
        if concepts is not None:
            self.H = torch.as_tensor(concepts.H, dtype=torch.float32, device=device)
            if concepts.shift is not None:
                self.shift = torch.as_tensor(concepts.shift, dtype=torch.float32, device=device)
                self.scale = torch.as_tensor(concepts.scale, dtype=torch.float32, device=device)
        self.out: dict[str, torch.Tensor] = {}
        self.want_grad = False
        self.grad_ref: torch.Tensor | None = None
        self.enabled = True  # False during the memory-layout dry run
        self.handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, inputs, output):
        if not self.enabled:
            return None
        a = output[0] if isinstance(output, (tuple, list)) else output
        if self.layout is None:
            self.layout = detect_layout(tuple(a.shape), self.model or module)
        replaced = None
        if self.want_grad:
            # GradCAM: the rest of the network is run from a fresh leaf so autograd records only the
            # layers after this one (parameters do not require grad), and the leaf's gradient is the
            # gradient of the output with respect to this layer.
            self.grad_ref = a.detach().clone().requires_grad_(True)
            passed_on = self.grad_ref * 1  # a non-leaf copy: the model may modify it in place (ReLU)
            replaced = passed_on if not isinstance(output, (tuple, list)) else \
                type(output)([passed_on, *output[1:]])
            a = self.grad_ref.detach()
        a = to_grid(a, self.layout).float()  # (B, C, h, w) whatever the layer's own layout
        if self.relu:
            a = torch.relu(a)
        b, c, h, w = a.shape
        cells = a.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, h*w, C)
        out = {"min": cells.amin()}
        if self.calib_cells:
            idx = self.cell_index.to(a.device)
            out["cells"] = torch.gather(cells, 1, idx[..., None].expand(-1, -1, c))  # (B, m, C)
            self.out = out
            raise _StopForward
        if self.shift is not None:
            cells = torch.clamp((cells - self.shift) / self.scale, min=0)
        out["embedding"] = cells.mean(dim=1)  # (B, C)
        if self.H is not None:
            flat = cells.reshape(-1, c)
            wts = nnls_rows(flat, self.H, n_iter=self.nnls_iter)  # (B*h*w, K)
            resid = flat - wts @ self.H
            out["cell_weights"] = wts.reshape(b, h, w, -1)
            out["sq_resid"] = resid.pow(2).sum(dim=1).reshape(b, -1).sum(dim=1)  # (B,)
            out["sq_norm"] = flat.pow(2).sum(dim=1).reshape(b, -1).sum(dim=1)
        self.out = out
        return replaced


def layer_geometry(model: torch.nn.Module, layer: torch.nn.Module, input_px: int) -> tuple[int, int, int]:
    """(C, h, w) cells of the layer's output for one input tile (see cells.py), from a CPU dry run."""
    layout = cell_layout(model, layer, input_px)[0]
    return layout.channels, layout.h, layout.w


def cell_layout(model: torch.nn.Module, layer: torch.nn.Module, input_px: int) -> tuple[CellLayout, tuple]:
    """How the layer's output maps onto cells, and its raw shape (batch first), from a CPU dry run on zeros."""
    shapes = []

    def grab(_m, _i, o):
        o = o[0] if isinstance(o, (tuple, list)) else o
        shapes.append(tuple(o.shape))
        raise _StopForward

    handle = layer.register_forward_hook(grab)
    try:
        with torch.inference_mode(), contextlib.suppress(_StopForward):
            model(torch.zeros(1, 3, input_px, input_px))
    finally:
        handle.remove()
    if not shapes:
        raise ValueError("the hooked layer never ran in a forward pass; choose another layer "
                         "(see `python -m precompute layers --model MODEL`).")
    return detect_layout(shapes[0], model), shapes[0]


def dry_outputs(model: torch.nn.Module, input_px: int) -> torch.Tensor:
    """(2, O) outputs for a mid-grey tile and a seeded noise tile (CPU), e.g. to spot probabilities."""
    x = torch.stack([torch.zeros(3, input_px, input_px),
                     torch.randn(3, input_px, input_px, generator=torch.Generator().manual_seed(0))])
    with torch.inference_mode():
        return _outputs_2d(model(x))


def choose_output_activation(requested: str, model_default: str | None, dry: torch.Tensor) -> tuple[str, str]:
    """(activation, note) for the run: the user's choice, else the model's own (ModelSpec.output_activation,
    e.g. 'none' for a headless feature extractor), else 'none' when the dry-run outputs `dry` (B, O) are
    already probabilities (softmax inside the model); 'auto' otherwise. The note says what was noticed."""
    probs = looks_like_probabilities(dry)
    if requested != "auto":
        note = ("the model's outputs already look like probabilities (non-negative, rows sum to 1); "
                f"--output-activation {requested} applies {requested} to them again. Pass --output-activation "
                "none if the model applies softmax itself.") if probs and requested != "none" else ""
        return requested, note
    if model_default:
        return model_default, ""
    if probs:
        return "none", ("the model's outputs already look like probabilities (non-negative, rows sum to 1: "
                        "softmax inside the model), so they are stored as they are (--output-activation none).")
    return "auto", ""


def looks_like_probabilities(y: torch.Tensor) -> bool:
    """True when (B, O) outputs with O > 1 are already probabilities: non-negative rows summing to 1."""
    y = y.float()
    return y.shape[1] > 1 and bool((y >= 0).all()) and bool(torch.allclose(y.sum(dim=1), torch.ones(1), atol=1e-3))


class Engine:
    """Runs uint8 tile batches through the model on one device and returns host numpy arrays."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, layer: torch.nn.Module, device: torch.device,
                 *, relu: bool, concepts: Concepts | None, calib_cells: int = 0, output_activation: str = "auto",
                 gradcam_output: int | None = None, gradcam_target: str | None = "logit",
                 importance_output: int | None = None):
        self.device = device
        self.gradcam_target = gradcam_target or "logit"  # targets.TARGETS: what of the output GradCAM explains
        self.spec = spec
        self.model = model.to(device).eval()
        self.gradcam_output = gradcam_output
        self.relu = relu
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Inputs go in the model's own (contiguous NCHW) layout. channels_last is faster on CUDA, but only
        # used after a dry run on the first real batch shows identical outputs (prefer_channels_last).
        self.channels_last: bool | None = None if device.type == "cuda" else False
        self.probe = LayerProbe(layer, relu=relu, concepts=concepts, device=device, calib_cells=calib_cells,
                                model=self.model)
        self.calib_cells = calib_cells
        self.output_activation = output_activation
        self.intervention = None  # concept importance by removal (intervention.py), opt-in
        if importance_output is not None and self.probe.H is not None:
            self.intervention = Intervention(layer, self.probe.H, relu=relu, shift=self.probe.shift,
                                             scale=self.probe.scale, output_index=importance_output,
                                             target=self.gradcam_target, output_activation=output_activation)

    def close(self) -> None:
        self.probe.remove()

    def _gradcam(self, logits: torch.Tensor) -> torch.Tensor:
        """GradCAM of the target y (targets.target_torch of output `gradcam_output`) at the hooked layer:
        ReLU(sum_c mean_hw(dy/dA_c) A_c), (B, h, w)."""
        a = self.probe.grad_ref
        y = target_torch(logits, self.gradcam_output, self.gradcam_target, self.output_activation)
        (grad,) = torch.autograd.grad(y.sum(), a)
        # Gradient and activations on the cell grid (patch tokens only for a ViT layer): (B, C, h, w).
        grad, act = to_grid(grad, self.probe.layout), to_grid(a.detach(), self.probe.layout).float()
        if self.relu:
            act = torch.relu(act)
        alpha = grad.float().mean(dim=(2, 3), keepdim=True)
        self.probe.grad_ref = None
        return torch.relu((alpha * act).sum(dim=1))

    def _autocast(self):
        dtype = autocast_dtype(self.device)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _choose_layout(self, x: torch.Tensor) -> None:
        self.probe.enabled = False
        try:
            # The tolerance allows for the different kernels of reduced-precision autocast.
            tol = 1e-3 if autocast_dtype(self.device) is None else 3e-2
            with torch.inference_mode(), self._autocast():
                self.channels_last = prefer_channels_last(self.model, x, tol)
        finally:
            self.probe.enabled = True

    def run(self, pixels: torch.Tensor, cell_index: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """pixels: (B, H, W, 3) uint8 on the host. Returns numpy arrays keyed like LayerProbe.out plus
        'outputs' (B, O) and 'probs' (B, O) in the full pass, and 'gradcam' (B, h, w) when asked for."""
        cam = self.gradcam_output is not None and cell_index is None
        # GradCAM needs autograd after the hooked layer; everything else runs in inference mode.
        mode = torch.enable_grad() if cam else torch.inference_mode()
        with mode:
            x = pixels.to(self.device, non_blocking=True)
            x = normalise_on_device(x, self.spec)
            if self.channels_last is None:
                self._choose_layout(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.probe.cell_index = cell_index
            self.probe.want_grad = cam
            y = None
            with self._autocast():
                try:
                    y = self.model(x)
                except _StopForward:
                    pass
            res = {k: v.detach().float().cpu().numpy() for k, v in self.probe.out.items()}
            if cam and y is not None:
                res["gradcam"] = self._gradcam(_outputs_2d(y)).cpu().numpy()
            if y is not None:
                logits = _outputs_2d(y).detach()
                res["outputs"] = logits.cpu().numpy()
                act = self.output_activation
                if act == "auto":
                    act = "softmax" if logits.shape[1] > 1 else "sigmoid"
                if act == "softmax":
                    res["probs"] = torch.softmax(logits, dim=1).cpu().numpy()
                elif act == "sigmoid":
                    res["probs"] = torch.sigmoid(logits).cpu().numpy()
        if self.intervention is not None and y is not None:
            res.update(self._importance(x, _outputs_2d(y).detach()))
        return res

    def _importance(self, x: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Concept removal at the hooked layer (intervention.py): importance (B, K), deletion (B, K + 1)."""
        probe = self.probe
        weights = probe.out["cell_weights"].detach()
        saved_h, probe.H, probe.want_grad = probe.H, None, False  # the probe only watches these reruns
        try:
            with torch.inference_mode():
                y_full = target_torch(logits.float(), self.intervention.output_index, self.intervention.target,
                                      self.output_activation)
                out = self.intervention.run(self.model, x.detach(), weights, y_full, self._autocast)
        finally:
            probe.H = saved_h
        return {name: value.float().cpu().numpy() for name, value in out.items()}


def _as_is(item):
    """Messages pass through unchanged (the default would turn numpy arrays into tensors)."""
    return item


def stream_slides(stream: TileStream, workers: int) -> Iterator[object]:
    """Iterate the worker messages (SlidePlan, TileBatch, SlideEnd, SlideFailed) in arrival order."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if workers else None, worker_init_fn=worker_init() if workers else None)
    yield from loader


__all__ = ["Engine", "LayerProbe", "layer_geometry", "pick_device", "stream_slides",
           "SlidePlan", "TileBatch", "SlideEnd", "SlideFailed"]
