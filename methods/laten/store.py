"""The files of a LaTen extraction folder, written by `LaTen.extract` and read back to fuse.

- `selection.json`: neuron counts, the translator's shape, and per group ("step0".. for the optimizer steps,
  "fuse" for the fusion) its example ids, the teacher's and the student's selected layers, and for steps the
  align batch and the step's loss;
- `selection.safetensors`: per group and model, the selected neuron indices `<group>.<model>.{ffn,o,v}`
  ([L_student, n], rank order) and all scores `<group>.<model>.{attn_layer,ffn_layer,ffn,o,v}_scores`;
- `translator.safetensors`: the translator's weights;
- `fuse_vectors.safetensors`: the teacher vectors of the fusion's selection, per module [L_student, n, d_teacher].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .align import Step, Translator
from .locate import Selection

_SCORES = ("attn_layer", "ffn_layer", "ffn", "o", "v")


def save(out: Path, translator: Translator, groups: dict, found: dict, fuse_vectors: dict[str, torch.Tensor],
         counts: dict[str, int], losses: list[float], plan: list[Step]) -> None:
    first = next(iter(translator.mlps.values()))
    meta = {"counts": counts, "translator": {"modules": list(translator.mlps), "d_teacher": first[0].in_features,
                                             "hidden": first[0].out_features, "d_student": first[2].out_features},
            "groups": {}}
    tensors = {}
    for name, examples in groups.items():
        entry = meta["groups"][name] = {"examples": [e.id for e in examples]}
        for model in ("teacher", "student"):
            scores, chosen = found[model][name]
            entry[model] = {"ffn_layers": chosen.ffn_layers, "attn_layers": chosen.attn_layers}
            for kind in ("ffn", "o", "v"):
                tensors[f"{name}.{model}.{kind}"] = getattr(chosen, kind)
            for label, values in zip(_SCORES, scores.tensors()):
                tensors[f"{name}.{model}.{label}_scores"] = values
    for i, (step, loss) in enumerate(zip(plan, losses)):
        meta["groups"][f"step{i}"].update(align=[e.id for e in step.batch], loss=loss)
    (out / "selection.json").write_text(json.dumps(meta, indent=1))
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out / "selection.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in translator.state_dict().items()}, out / "translator.safetensors")
    save_file({k: v.contiguous() for k, v in fuse_vectors.items()}, out / "fuse_vectors.safetensors")


def load_fusion(folder: Path) -> tuple[Translator, Selection, dict[str, torch.Tensor]]:
    """The trained translator, the student's fusion selection and the teacher vectors it receives."""
    meta = json.loads((folder / "selection.json").read_text())
    shape = meta["translator"]
    translator = Translator(shape["modules"], shape["d_teacher"], shape["d_student"], shape["hidden"], 0.0, 0)
    translator.load_state_dict(load_file(folder / "translator.safetensors"))
    tensors = load_file(folder / "selection.safetensors")
    layers = meta["groups"]["fuse"]["student"]
    selection = Selection(layers["ffn_layers"], layers["attn_layers"],
                          *(tensors[f"fuse.student.{kind}"] for kind in ("ffn", "o", "v")))
    return translator, selection, load_file(folder / "fuse_vectors.safetensors")
