"""The explained target: which number of the model's output the regression, GradCAM and the
intervention importance explain, for output (class) c of a model with O outputs z (logits).

- `logit`:     z_c, the raw score. For a softmax head it has a free offset (adding one number to every
               logit changes no probability), so its sign and size say little on their own.
- `log-odds`:  log(p_c / (1 - p_c)). Softmax head: z_c - logsumexp_{j != c} z_j (one-vs-rest);
               sigmoid head (or one output): z_c itself, which already is the log-odds.
- `contrast`:  z_c - mean_{j != c} z_j, the logit against the mean of the others (offset-free and linear).

Defaults (`default_target`): log-odds for multi-output softmax heads, logit otherwise (sigmoid heads,
one output, no activation). numpy only; the torch version (GradCAM, intervention) is
model_outputs.target_torch.
"""

from __future__ import annotations

import numpy as np

TARGETS = ("logit", "log-odds", "contrast")

DESCRIPTIONS = {
    "logit": "the raw logit of the output",
    "log-odds": "the one-vs-rest log-odds log(p / (1 - p)) of the output",
    "contrast": "the logit minus the mean of the other logits",
}


def check_target(name: str | None) -> str | None:
    """None (use the default) or one of TARGETS; a ValueError that lists them otherwise."""
    if name is None:
        return None
    key = str(name).strip().lower().replace("_", "-")
    if key in ("logodds", "log-odds"):
        key = "log-odds"
    if key not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}; got {name!r}.")
    return key


def default_target(output_activation: str, n_outputs: int) -> str:
    """log-odds for a softmax head with more than one output; logit for sigmoid heads, single outputs
    and models without an output activation. output_activation: auto | softmax | sigmoid | none."""
    act = output_activation
    if act == "auto":
        act = "softmax" if n_outputs > 1 else "sigmoid"
    return "log-odds" if act == "softmax" and n_outputs > 1 else "logit"


def target_values(outputs: np.ndarray, index: int, kind: str, output_activation: str = "auto") -> np.ndarray:
    """The target per tile from the stored logits. outputs: (N, O) logits. Returns (N,) float64."""
    z = np.asarray(outputs, dtype=np.float64)
    if z.ndim != 2 or not 0 <= index < z.shape[1]:
        raise ValueError(f"outputs must be (N, O) with output {index} in range; got shape {z.shape}.")
    zc = z[:, index]
    if kind == "logit" or z.shape[1] == 1 or (kind == "log-odds" and is_sigmoid(output_activation, z.shape[1])):
        return zc
    others = np.delete(z, index, axis=1)
    if kind == "contrast":
        return zc - others.mean(axis=1)
    if kind == "log-odds":
        m = others.max(axis=1, keepdims=True)
        return zc - (m[:, 0] + np.log(np.exp(others - m).sum(axis=1)))
    raise ValueError(f"unknown target {kind!r}; one of {', '.join(TARGETS)}.")


def is_sigmoid(output_activation: str, n_outputs: int) -> bool:
    """Whether each output is its own sigmoid (multi-label head): its logit is its log-odds."""
    return output_activation == "sigmoid" or (output_activation == "auto" and n_outputs == 1)


def describe(kind: str, output_name: str) -> str:
    """'the one-vs-rest log-odds log(p / (1 - p)) of the output TUM' (for reports and the dashboard)."""
    return f"{DESCRIPTIONS.get(kind, kind)} {output_name}"
