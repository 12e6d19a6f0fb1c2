"""Model files: safetensors weights plus a JSON card (architecture, preprocessing, provenance, sha256).

Nothing here unpickles: weights are safetensors, metadata is JSON. The JSON records the sha256 of
the weights file, and the weights' header records the sha256 of the JSON fields that decide what
inference does, so neither file can be altered or swapped without the loader noticing.

A card may instead name one member of an ensemble card beside it (``weights_of``): it then runs that member's
weights alone, so a network bundled in an ensemble can also ship on its own without a second copy of its bytes.
Its architecture, preprocessing and structures must equal the member's, and the ensemble's own checks apply.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError
from .preprocess import Plan
from .terminology import CATALOGUE, Structure, structures_from_card

FORMAT = "liversegunet-model/2"
#: The first format named its one output by ``label`` (an organ); it is still read.
FORMAT_V1 = "liversegunet-model/1"
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "liver_unet2d.json"
#: The multi-structure model (liver, tumours, vessels, neighbouring organs), when one is bundled.
STRUCTURES_MODEL = MODELS_DIR / "structures_unet2d.json"
#: The accurate liver model (an ensemble of networks, slower), when one is bundled.
ACCURATE_MODEL = MODELS_DIR / "liver_accurate_unet2d.json"
#: Bundled models by the name ``--to`` / the CLI use.
BUNDLED = {"liver": DEFAULT_MODEL, "structures": STRUCTURES_MODEL, "accurate": ACCURATE_MODEL}
_BEHAVIOUR_KEYS = ("model_id", "architecture", "preprocessing", "structures")
_BEHAVIOUR_KEYS_V1 = ("model_id", "architecture", "preprocessing", "label")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _behaviour_keys(card: dict) -> tuple[str, ...]:
    return _BEHAVIOUR_KEYS_V1 if card.get("format") == FORMAT_V1 else _BEHAVIOUR_KEYS


def _behaviour_hash(card: dict) -> str:
    return sha256_bytes(json.dumps({k: card[k] for k in _behaviour_keys(card)}, sort_keys=True).encode())


@dataclass
class LoadedModel:
    """A ready-to-run network with the card that describes it."""

    network: object  # a torch.nn.Module (the UNet2D or Ensemble of the card)
    plan: Plan
    card: dict
    path: Path

    @property
    def model_id(self) -> str:
        """The model's identifier from its card."""
        return self.card["model_id"]

    @property
    def structures(self) -> list[Structure]:
        """The output structures, one per network channel, in channel order."""
        return card_structures(self.card)


def card_structures(card: dict) -> list[Structure]:
    """The checked structure list of a card (a format-1 card's ``label`` is its one structure)."""
    where = f"model {card.get('model_id', '?')}"
    if card.get("format") == FORMAT_V1:
        label = card.get("label")
        if label not in CATALOGUE:
            raise WeightsError(f"{where}: unknown label {label!r}; known: {', '.join(CATALOGUE)}")
        entries = [CATALOGUE[label].to_card()]
    else:
        entries = card.get("structures")
    return structures_from_card(entries, int(card.get("architecture", {}).get("out_channels", 1)), where)


def network_stride(network) -> int:
    """The size, in pixels, that every model-grid side must be a multiple of for ``network``: ``2**depth`` of a
    ``UNet2D``, of its deepest member for an ``Ensemble``."""
    members = getattr(network, "members", [network])
    return max(2**m.depth for m in members)


def build_network(architecture: dict):
    """An untrained network of the described architecture: a ``UNet2D``, or an ``Ensemble`` of them."""
    from .model import Ensemble, UNet2D

    name = architecture.get("name")
    if name == "Ensemble":
        members = architecture.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise WeightsError("an Ensemble architecture lists two or more UNet2D members under 'members'")
        if any(not isinstance(m, dict) or m.get("name") != "UNet2D" for m in members):
            raise WeightsError("every Ensemble member must be a UNet2D architecture")
        for key in ("in_channels", "out_channels"):
            found = {m.get(key) for m in members} | {architecture.get(key)}
            if len(found) != 1:
                raise WeightsError(f"Ensemble members and the ensemble must agree on {key} (found {sorted(found)})")
        return Ensemble([build_network(m) for m in members])
    if name != "UNet2D":
        raise WeightsError(f"unknown architecture {name!r}; this version knows UNet2D and Ensemble")
    args = {k: v for k, v in architecture.items() if k != "name"}
    try:
        return UNet2D(**args)
    except TypeError as exc:
        raise WeightsError(f"architecture parameters {args} do not fit UNet2D: {exc}") from exc


def model_card(network, plan: Plan, model_id: str, structures: list[Structure]) -> dict:
    """The card fields that decide what inference does, for ``network`` whose output channels are
    ``structures`` in order; a network that does not fit the plan or the structures is refused."""
    architecture = network.architecture()
    if architecture["in_channels"] != plan.in_channels:
        raise WeightsError(
            f"the network takes {architecture['in_channels']} input channels, the plan gives {plan.in_channels}"
        )
    card = {
        "format": FORMAT,
        "model_id": model_id,
        "architecture": architecture,
        "preprocessing": plan.to_dict(),
        "structures": [s.to_card() for s in structures],
    }
    card_structures(card)
    return card


def same_weights(a: bytes, b: bytes) -> bool:
    """Whether two safetensors files hold the same tensors and metadata, whatever the order of their header keys."""
    import struct

    def split(data: bytes):
        n = struct.unpack("<Q", data[:8])[0]
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    try:
        (header_a, data_a), (header_b, data_b) = split(a), split(b)
    except (struct.error, ValueError):
        return False
    return header_a == header_b and data_a == data_b


def save_model(
    network,
    plan: Plan,
    path: str | os.PathLike,
    *,
    model_id: str,
    structures: list[Structure] = (CATALOGUE["liver"],),
    provenance: dict | None = None,
    dtype: str = "float16",
) -> Path:
    """Write ``<path>.json`` and ``<path>.safetensors`` for ``network``, whose output channels are
    ``structures`` in order; returns the JSON path."""
    import torch
    from safetensors.torch import save

    path = Path(path).with_suffix("")
    card = model_card(network, plan, model_id, structures)  # refused before anything is written
    state = {
        k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v).contiguous().cpu()
        for k, v in network.state_dict().items()
    }
    data = save(state, metadata={"format": FORMAT, "card_sha256": _behaviour_hash(card)})
    card.update(
        {
            "weights_file": path.name + ".safetensors",
            "weights_sha256": sha256_bytes(data),
            "weights_dtype": dtype,
            "provenance": provenance or {},
            "license": "Weights trained on 3D-IRCADb-01 (IRCAD France, CC BY-NC-ND 4.0)"
            + (
                " and Medical Segmentation Decathlon Task03 Liver slices (LiTS, CC BY-SA 4.0)"
                if (provenance or {}).get("extra_2d_slices")
                else ""
            )
            + ": non-commercial research use only; not a medical device.",
        }
    )
    from .outputs import atomic_write_bytes

    target = path.parent / card["weights_file"]
    existing = target.read_bytes() if target.exists() else b""
    if existing and same_weights(existing, data):
        # the same tensors and metadata (safetensors writes the metadata in no fixed order): keep the file's bytes,
        # so a card re-saved with new provenance keeps its weights' checksum and adds no copy of them to a repository
        data = existing
        card["weights_sha256"] = sha256_bytes(data)
    atomic_write_bytes(target, data)
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(card, indent=2) + "\n").encode())
    return path.with_suffix(".json")


def save_member_card(
    ensemble: str | os.PathLike, member: int, path: str | os.PathLike, *, model_id: str, provenance: dict
) -> Path:
    """Write ``<path>.json``: a card that runs member ``member`` of the ensemble card ``ensemble`` (in the same
    folder) alone, on that ensemble's weights file; returns its path."""
    ensemble, path = Path(ensemble), Path(path).with_suffix(".json")
    if ensemble.parent.resolve() != path.parent.resolve():
        raise WeightsError(f"{path}: a card can only share the weights of an ensemble card in its own folder")
    parent = read_card(ensemble)
    members = parent["architecture"].get("members", [])
    if not 0 <= member < len(members):
        raise WeightsError(f"{ensemble.name} has {len(members)} members, not a member {member}")
    card = {
        "format": FORMAT,
        "model_id": model_id,
        "architecture": members[member],
        "preprocessing": parent["preprocessing"],
        "structures": parent["structures"],
        "weights_of": {"card": ensemble.name, "member": member},
        "weights_dtype": parent.get("weights_dtype"),
        "provenance": provenance,
        "license": parent["license"],
    }
    card_structures(card)
    _member_state(path, card)  # the ensemble's weights verified and the member found, before anything is written
    from .outputs import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(card, indent=2) + "\n").encode())
    return path


def read_card(path: str | os.PathLike) -> dict:
    """The JSON card of a model, checked for the fields inference needs."""
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: model card not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: model card is not valid JSON ({exc})") from exc
    if not isinstance(card, dict) or card.get("format") not in (FORMAT, FORMAT_V1):
        found = card.get("format") if isinstance(card, dict) else None
        raise WeightsError(f"{path}: not a {FORMAT} model card (format {found!r})")
    own_weights = ("weights_of",) if "weights_of" in card else ("weights_file", "weights_sha256")
    missing = [k for k in (*_behaviour_keys(card), *own_weights) if k not in card]
    if missing:
        raise WeightsError(f"{path}: not a {FORMAT} model card (missing {missing})")
    shared = card.get("weights_of")
    if shared is not None and not (
        isinstance(shared, dict) and isinstance(shared.get("card"), str) and type(shared.get("member")) is int
    ):
        raise WeightsError(
            f"{path}: 'weights_of' must name a 'card' (file name) and a 'member' (index), got {shared!r}"
        )
    card_structures(card)
    return card


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model card needs: itself and its weights (for a card that shares an ensemble member's
    weights, also that ensemble's card and weights). For copying or packaging a model."""
    path = Path(path)
    card = read_card(path)
    if "weights_of" in card:
        return [path, *model_files(path.parent / card["weights_of"]["card"])]
    return [path, path.parent / card["weights_file"]]


def _verified_state(path: Path, card: dict) -> dict:
    """The tensors of the weights file ``card`` (at ``path``) names, after its checksum and the card fields
    recorded in its header are checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights_path = path.parent / card["weights_file"]
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError as exc:
        raise WeightsError(f"{weights_path}: weights file not found (the card {path.name} names it)") from exc
    actual = sha256_bytes(data)
    if actual != card["weights_sha256"]:
        raise WeightsError(
            f"{weights_path}: checksum mismatch (sha256 {actual[:12]}..., card says {card['weights_sha256'][:12]}...); "
            "the file is corrupted or was replaced: reinstall the model"
        )
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{weights_path}: not a valid safetensors file ({exc})") from exc
    if meta.get("card_sha256") != _behaviour_hash(card):
        raise WeightsError(f"{path}: the card's architecture/preprocessing do not match the weights it was saved with")
    return state


def _member_state(path: Path, card: dict) -> dict:
    """The tensors of the ensemble member a ``weights_of`` card names, once the ensemble's card and weights are
    verified and the member is checked to be what this card describes."""
    shared = card["weights_of"]
    parent_path, index = path.parent / shared["card"], shared["member"]
    parent = read_card(parent_path)
    architecture = parent["architecture"]
    members = architecture.get("members", []) if architecture.get("name") == "Ensemble" else []
    if "weights_of" in parent or not 0 <= index < len(members):
        raise WeightsError(
            f"{path}: names member {index} of {parent_path.name}, which is not an ensemble with its own weights "
            f"and that many members; re-export the model"
        )
    for key, mine, theirs in (
        ("architecture", card["architecture"], members[index]),
        ("preprocessing", card["preprocessing"], parent["preprocessing"]),
        ("structures", card.get("structures"), parent.get("structures")),
    ):
        if mine != theirs:
            raise WeightsError(
                f"{path}: its {key} differs from member {index} of {parent_path.name}, whose weights it runs; "
                "re-export the model"
            )
    prefix = f"members.{index}."
    return {k[len(prefix) :]: v for k, v in _verified_state(parent_path, parent).items() if k.startswith(prefix)}


def load_model(path: str | os.PathLike | None = None, device: str = "cpu") -> LoadedModel:
    """Load and verify a model (the bundled one by default) onto ``device``, in eval mode."""
    import torch

    path = Path(path) if path else DEFAULT_MODEL
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    card = read_card(path)
    state = _member_state(path, card) if "weights_of" in card else _verified_state(path, card)
    try:
        plan = Plan.from_dict(card["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: bad preprocessing block ({exc})") from exc
    network = build_network(card["architecture"])
    stride = network_stride(network)
    if plan.multiple % stride:
        raise WeightsError(
            f"{path}: the model grid is padded to a multiple of {plan.multiple} pixels but the network halves it "
            f"{stride.bit_length() - 1} times (needs a multiple of {stride}); re-export the model"
        )
    try:
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not fit the architecture ({exc})") from exc
    network.eval().to(device)
    if device == "cpu":
        network.to(memory_format=torch.channels_last)
    return LoadedModel(network, plan, card, path)
