"""Compute torchdistill 1.1.5's values of the losses kdbench also implements, on fixed random tensors, and store
inputs and values as JSON (``torchdistill_1.1.5.json``) for ``tests/test_golden.py``, which needs no torchdistill.

Run once, with torchdistill outside the venv (it is not a dependency)::

    .venv/bin/python -m pip install --no-deps --target /tmp/td torchdistill==1.1.5
    PYTHONPATH=/tmp/td .venv/bin/python tests/golden/make_torchdistill_golden.py

Losses (torchdistill ``torchdistill/losses/mid_level.py`` unless noted): ``KDLoss``; the FitNet hint as
torchdistill composes it (``SimpleLossWrapper`` around ``nn.MSELoss``); ``ATLoss`` (mode ``code``); ``DISTLoss``;
``CRDLoss`` (fixed memory banks and negatives); ``SRDLoss``; ``HierarchicalContextLoss`` (ReviewKD's HCL).
torchdistill has no DKD.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

OUT = Path(__file__).resolve().parent / "torchdistill_1.1.5.json"


def rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale


def io(**tensors: Tensor) -> dict:
    """torchdistill's io_dict: module path -> {'output': tensor}."""
    return {path: {"output": t} for path, t in tensors.items()}


def as_list(t: Tensor) -> dict:
    """A tensor as JSON: float32 values with 9 significant digits, which read back to the same float32."""
    values = t.flatten().tolist()
    if t.is_floating_point():
        values = [float(f"{v:.9g}") for v in values]
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "data": values}


def dumps(data: dict) -> str:
    """Indented JSON with every ``data`` list on one line."""
    lists: list[list] = []

    def stash(node):
        if isinstance(node, dict):
            return {k: (f"@{len(lists)}@", lists.append(v))[0] if k == "data" else stash(v) for k, v in node.items()}
        return node

    text = json.dumps(stash(data), indent=1)
    for i, values in enumerate(lists):
        text = text.replace(f'"@{i}@"', json.dumps(values, separators=(",", ":")))
    return text + "\n"


def cases() -> dict[str, dict]:
    from torchdistill.losses.mid_level import (
        ATLoss, CRDLoss, DISTLoss, HierarchicalContextLoss, KDLoss, SimpleLossWrapper, SRDLoss,
    )  # fmt: skip

    g = torch.Generator().manual_seed(1234)
    out: dict[str, dict] = {}

    for name, (t, alpha) in {"kd_crd": (4.0, 0.1), "kd_imagenet": (1.0, 0.5)}.items():
        s, te, y = rand(g, 8, 10, scale=3), rand(g, 8, 10, scale=3), torch.randint(0, 10, (8,), generator=g)
        loss = KDLoss(".", "output", ".", "output", temperature=t, alpha=alpha)(io(**{".": s}), io(**{".": te}), y)
        out[name] = {"inputs": {"student": s, "teacher": te, "targets": y},
                     "params": {"temperature": t, "ce_weight": alpha, "kd_weight": 1 - alpha}, "value": loss}

    s, te = rand(g, 2, 8, 4, 4), rand(g, 2, 8, 4, 4)
    wrapper = SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": False, "module_path": "regressor", "io": "output"},
                                target={"is_from_teacher": True, "module_path": "layer2", "io": "output"})
    out["fitnet"] = {"inputs": {"student": s, "teacher": te}, "params": {},
                     "value": wrapper(io(regressor=s), io(layer2=te), None)}

    shapes = [((2, 4, 6, 6), (2, 8, 6, 6)), ((2, 8, 3, 3), (2, 16, 3, 3)), ((2, 16, 2, 2), (2, 32, 2, 2))]
    maps = {f"{side}{i}": rand(g, *shape) for i, pair in enumerate(shapes) for side, shape in zip("st", pair)}
    pairs = {f"pair{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                          "weight": 1} for i in range(len(shapes))}  # fmt: skip
    student_io = io(**{k: v for k, v in maps.items() if k.startswith("s")})
    teacher_io = io(**{k: v for k, v in maps.items() if k.startswith("t")})
    out["at"] = {"inputs": maps, "params": {"p": 2.0}, "value": ATLoss(pairs, mode="code")(student_io, teacher_io)}

    s, te = rand(g, 8, 10, scale=3), rand(g, 8, 10, scale=3)
    dist = DISTLoss(".", "output", ".", "output", beta=2.0, gamma=2.0, tau=4.0)
    out["dist"] = {"inputs": {"student": s, "teacher": te}, "params": {"beta": 2.0, "gamma": 2.0, "temperature": 4.0},
                   "value": dist(io(**{".": s}), io(**{".": te}))}

    n, d, b, k, tau = 24, 8, 4, 12, 0.07
    crd = CRDLoss("s", "empty", "t", input_size=d, output_size=n, num_negative_samples=k, num_samples=n,
                  temperature=tau, momentum=0.5)  # fmt: skip
    memory_s = nn.functional.normalize(rand(g, n, d), dim=1)  # torchdistill's memory_v1 (student embeddings)
    memory_t = nn.functional.normalize(rand(g, n, d), dim=1)  # memory_v2 (teacher embeddings)
    crd.memory_v1.copy_(memory_s)
    crd.memory_v2.copy_(memory_t)
    e_s, e_t = nn.functional.normalize(rand(g, b, d), dim=1), nn.functional.normalize(rand(g, b, d), dim=1)
    pos = torch.randperm(n, generator=g)[:b]
    contrast = torch.cat([pos.unsqueeze(1), torch.randint(0, n, (b, k), generator=g)], dim=1)
    empty = {"empty": {"input": {"pos_idx": pos, "contrast_idx": contrast}}}
    value = crd({"s": {"output": e_s}, **empty}, {"t": {"output": e_t}})
    out["crd"] = {"inputs": {"memory_s": memory_s, "memory_t": memory_t, "student": e_s, "teacher": e_t,
                             "contrast": contrast},
                  "params": {"num_data": n, "nce_t": tau}, "value": value}  # fmt: skip

    f_s, f_t = rand(g, 6, 12), rand(g, 6, 12)
    z_s, z_t = rand(g, 6, 10, scale=2), rand(g, 6, 10, scale=2)
    srd = SRDLoss("norm", "output", "norm", "output", ".", "output", ".", "output", exponent=4.0, temperature=1.0)
    out["srd"] = {"inputs": {"student_features": f_s, "teacher_features": f_t, "student": z_s, "teacher": z_t},
                  "params": {"exponent": 4.0, "temperature": 1.0},
                  "value": srd({"norm": {"output": f_s}, ".": {"output": z_s}}, {"norm": {"output": f_t}, ".": {"output": z_t}})}  # fmt: skip

    levels = {}
    total = torch.zeros(())
    hcl = HierarchicalContextLoss("abf", "output", "t", "output", output_sizes=[4, 2, 1])
    for i, size in enumerate((8, 4, 1)):
        fs, ft = rand(g, 2, 4, size, size), rand(g, 2, 4, size, size)
        levels[f"s{i}"], levels[f"t{i}"] = fs, ft
        total = total + hcl({"abf": {"output": (fs, None)}}, io(t=ft))  # torchdistill: one level per loss module
    out["hcl"] = {"inputs": levels, "params": {}, "value": total}
    return out


def main() -> int:
    import torchdistill

    data = {
        "torchdistill": torchdistill.__version__,
        "torch": torch.__version__,
        "note": "written by tests/golden/make_torchdistill_golden.py; read by tests/test_golden.py",
        "cases": {
            name: {"inputs": {k: as_list(v) for k, v in case["inputs"].items()}, "params": case["params"],
                   "value": float(case["value"])}
            for name, case in cases().items()
        },
    }  # fmt: skip
    if data["torchdistill"] != "1.1.5":
        print(f"expected torchdistill 1.1.5, found {data['torchdistill']}", file=sys.stderr)
        return 1
    OUT.write_text(dumps(data))
    print(f"wrote {OUT} ({len(data['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
