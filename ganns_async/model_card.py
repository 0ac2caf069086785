"""The model card of a run's Hub repository: ``README.md`` in ``OUT/generator/``.

Built with huggingface_hub's ``ModelCard``/``ModelCardData`` from the template
``templates/model_card.md``, so the Hub reads its metadata (library, pipeline tag, tags,
dataset, SWD as an evaluation result). A card someone edited (on the Hub, or in the folder)
keeps its prose: :func:`merge_card` updates only the metadata this project owns and the
blocks between ``<!-- ganns-async:NAME -->`` markers (samples, training figures).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
TITLE = "GANNs with Friends - Distributed DCGAN for CelebA"
CHECKPOINT_NAME = "checkpoint_latest.pth"  # as ganns_async.outputs (not imported: it pulls in torch)
DATA_REPO = "gperdrizet/GANNs-with-friends"
DATA_FILE = "data/img_align_celeba.zip"


def generator_parameters(f: int) -> int:
    """Parameters of ``Generator(feature_maps=f)`` (conv weights, no biases; BatchNorm's two),
    counted without building it (this module does not import torch); 3,576,704 at 64."""
    return 16 * (100 * 8 * f + 8 * f * 4 * f + 4 * f * 2 * f + 2 * f * f + f * 3) + 2 * (8 + 4 + 2 + 1) * f


def discriminator_parameters(f: int) -> int:
    """Parameters of ``Discriminator(feature_maps=f)``."""
    return 16 * (3 * f + f * 2 * f + 2 * f * 4 * f + 4 * f * 8 * f + 8 * f) + 2 * (2 + 4 + 8) * f

# Metadata keys the card's owner (the coordinator) keeps up to date; any other key someone
# added stays as they wrote it. Tags are merged (theirs are kept, ours are added).
OWNED_KEYS = ("library_name", "pipeline_tag", "datasets", "model-index", "model_name")
_BLOCK = re.compile(r"<!-- ganns-async:(?P<name>[a-z-]+) -->.*?<!-- /ganns-async:(?P=name) -->", re.S)

# The coordinator's train thread writes the folder's card, the Hub pusher's thread writes back
# the card it pushed: one read-merge-replace at a time.
CARD_LOCK = threading.Lock()


def _fmt_int(value: Any) -> str:
    if isinstance(value, bool):
        return "unknown"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "unknown"


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "unknown"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _workers_count(workers: Any) -> str:
    if isinstance(workers, int) and not isinstance(workers, bool):
        return f"{workers:,}"
    if isinstance(workers, (Sequence, set, frozenset)) and not isinstance(workers, (str, bytes)):
        return f"{len(workers):,}"  # a count only: worker names stay out of a public card
    return "unknown"


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def card_data(info: Mapping[str, Any]) -> Any:
    """The card's metadata (a ``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import EvalResult, ModelCardData

    from ganns_async.model import HUB_TAGS

    repo_id = str(info.get("repo_id") or "ganns-out/generator")
    swd = _finite(info.get("swd"))
    evals = None
    if swd is not None:
        evals = [EvalResult(task_type="unconditional-image-generation", task_name="Unconditional image generation",
                            dataset_type="celeba", dataset_name="CelebA (64x64)", metric_type="swd",
                            metric_name="SWD x1e3 (sliced Wasserstein distance, lower is better)", metric_value=swd,
                            verified=False)]
    return ModelCardData(
        license="mit",
        library_name="ganns-async",
        pipeline_tag="unconditional-image-generation",
        tags=[*HUB_TAGS, "model_hub_mixin", "pytorch_model_hub_mixin"],
        datasets=["celeba"],
        model_name=repo_id.rsplit("/", 1)[-1] if evals else None,
        eval_results=evals,
    )


def render_card(info: Mapping[str, Any]) -> str:
    """A fresh README.md for ``info`` (step, epoch, images_seen, workers, swd, config, repo_id,
    sample_name, has_metrics; anything missing reads "unknown")."""
    from huggingface_hub import ModelCard

    cfg: Mapping[str, Any] = info.get("config") or {}
    unit_size = cfg.get("unit_size")
    units_per_step = cfg.get("units_per_step")
    local_steps = max(1, _int(cfg.get("local_steps"), 1))
    if local_steps > 1:
        update_rule = (f"local steps: each unit is {local_steps} alternating D/G Adam steps on a worker; a round "
                       f"averages the changes (outer lr {_fmt_num(cfg.get('outer_lr', 1.0))}, momentum "
                       f"{_fmt_num(cfg.get('outer_momentum', 0.0))})")
        batch = f"{_fmt_num(unit_size)} images per worker step"
    else:
        update_rule = "exact: averaged gradients, one Adam step per step"
        if isinstance(unit_size, int) and isinstance(units_per_step, int) and units_per_step > 0:
            batch = f"{unit_size * units_per_step:,} ({units_per_step} units x {unit_size} images)"
        else:
            batch = f"{_fmt_num(unit_size)} images per unit, one unit per worker"
    feature_maps = _int(cfg.get("feature_maps"), 64)
    if not 1 <= feature_maps <= 512:
        feature_maps = 64
    staleness = cfg.get("max_staleness")
    if isinstance(staleness, int) and not isinstance(staleness, bool):
        staleness = f"{staleness} optimizer step{'' if staleness == 1 else 's'}"
    swd = _finite(info.get("swd"))
    card = ModelCard.from_template(
        card_data(info),
        template_path=str(TEMPLATE),
        title=TITLE,
        repo_id=str(info.get("repo_id") or "ganns-out/generator"),
        sample_name=info.get("sample_name"),
        has_metrics=bool(info.get("has_metrics")),
        step=_fmt_int(info.get("step")),
        epoch=_fmt_int(info.get("epoch")),
        images_seen=_fmt_int(info.get("images_seen")),
        workers=_workers_count(info.get("workers")),
        swd=f"{swd:.1f}" if swd is not None else "not recorded yet",
        ema=(_finite(cfg.get("g_ema")) or 0.0) > 0,
        update_rule=update_rule,
        batch=batch,
        lr=_fmt_num(cfg.get("lr")),
        beta1=_fmt_num(cfg.get("beta1")),
        beta2=_fmt_num(cfg.get("beta2")),
        staleness=_fmt_num(staleness),
        seed=_fmt_num(cfg.get("seed")),
        latent_dim=100,
        image_size=64,
        feature_maps=feature_maps,
        generator_parameters=f"{generator_parameters(feature_maps):,}",
        discriminator_parameters=f"{discriminator_parameters(feature_maps):,}",
        checkpoint_name=CHECKPOINT_NAME,
        data_repo=DATA_REPO,
        data_file=DATA_FILE,
    )
    return str(card.content).rstrip("\n") + "\n"


def merge_card(previous: str | None, fresh: str) -> str:
    """``fresh``'s metadata and marked blocks, in ``previous``'s prose.

    Keys in :data:`OWNED_KEYS` come from ``fresh``; tags are the union; other keys stay as
    ``previous`` has them. Each ``<!-- ganns-async:NAME -->`` block found in ``previous`` is
    replaced by ``fresh``'s; a block someone deleted stays deleted. A ``previous`` that is
    empty or whose metadata does not parse is replaced by ``fresh``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not previous or not previous.strip():
        return fresh
    try:
        old = ModelCard(previous, ignore_metadata_errors=True)
        old_meta = old.data.to_dict()
    except Exception:  # noqa: BLE001 - unreadable front matter: start over with ours
        return fresh
    new = ModelCard(fresh)
    new_meta = new.data.to_dict()
    meta = dict(old_meta)
    for key in OWNED_KEYS:
        if key in new_meta:
            meta[key] = new_meta[key]
        else:
            meta.pop(key, None)
    for key, value in new_meta.items():
        meta.setdefault(key, value)
    old_tags = old_meta.get("tags") or []
    if isinstance(old_tags, str):
        old_tags = [old_tags]
    meta["tags"] = list(dict.fromkeys([*(str(t) for t in old_tags), *new_meta.get("tags", [])]))

    blocks = {m.group("name"): m.group(0) for m in _BLOCK.finditer(new.text)}
    text = _BLOCK.sub(lambda m: blocks.get(m.group("name"), m.group(0)), old.text)
    data = ModelCardData(**meta)
    return f"---\n{data.to_yaml()}\n---\n{text}"


def card_metadata(text: str) -> dict[str, Any]:
    """The metadata of a card's text, as huggingface_hub reads it."""
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()
