"""TA-LoRA's fast weights in saved adapters: ``‖v_i‖``, each task's deviation ``‖(B u_i) v_iᵀ‖`` relative to ``‖θ0‖``,
the alignment of two tasks' ``u`` and the gates, per adapted layer (docs/methods.md, the variant study).

Usage: ``python bench/talora_norms.py ADAPTER_DIR [ADAPTER_DIR ...]``; e.g. the quality harness's saved multi-task run
``bench/quality-runs/default/saved/multitask-talora-lr0.015-s0`` against the same unit without the orthogonality
term, saved by ``python bench/quality --unit '{"task": "multitask", "method": "talora-orth0", "lr": 0.015, "seed": 0,
"epochs": 3, "max_length": 64, "limit": 0, "save": "DIR"}' --out FILE.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
from safetensors.numpy import load_file


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def describe(path: str) -> None:
    tensors = load_file(glob.glob(os.path.join(path, "*.safetensors"))[0])
    with open(os.path.join(path, "adapter_config.json")) as f:
        tasks = json.load(f).get("tasks") or sorted({k.rsplit(".", 1)[1] for k in tensors if ".talora.u." in k})
    print(path)
    for layer in sorted({k.split(".talora.")[0] for k in tensors if ".talora." in k}):
        p = layer + ".talora."
        u = {t: tensors[p + "u." + t] for t in tasks}
        v = {t: tensors[p + "v." + t] for t in tasks}
        theta = np.linalg.norm(tensors[p + "theta0"])
        deviation = {t: np.linalg.norm(np.outer(tensors[p + "B"] @ u[t], v[t])) / theta for t in tasks}
        gate = float(np.abs(np.tanh(tensors[p + "gate"])).mean())
        print(
            f"  {layer.split('encoder.')[-1]}: ‖v‖ "
            + ", ".join(f"{t} {np.linalg.norm(v[t]):.1f}" for t in tasks)
            + "; ‖B u vᵀ‖/‖θ0‖ "
            + ", ".join(f"{deviation[t]:.2f}" for t in tasks)
            + f"; cos(u_{tasks[0]}, u_{tasks[1]}) {cosine(u[tasks[0]], u[tasks[1]]):+.2f}; mean |tanh g| {gate:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", nargs="+", help="TA-LoRA adapter directories (lr.save_adapter)")
    for path in ap.parse_args().adapters:
        describe(path)


if __name__ == "__main__":
    main()
