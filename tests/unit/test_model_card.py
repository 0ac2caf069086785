"""The Hub-native model: OUT/generator/ loads with from_pretrained, the card's metadata is what
the Hub reads, and a card someone edited keeps its prose."""

from __future__ import annotations

import math
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

from ganns_async.model import Generator
from ganns_async.model_card import merge_card, render_card
from ganns_async.outputs import write_generator
from ganns_async.training import Trainer, TrainConfig

INFO: dict[str, Any] = {
    "step": 40, "epoch": 2, "images_seen": 40960, "workers": 12, "swd": 73.14, "repo_id": "room101/faces",
    "sample_name": "step_000040.png", "has_metrics": True,
    "config": {"unit_size": 32, "units_per_step": 0, "local_steps": 32, "outer_lr": 1.0, "outer_momentum": 0.0,
               "max_staleness": 0, "lr": 2e-4, "beta1": 0.5, "beta2": 0.999, "seed": 7, "g_ema": 0.999},
}


def test_metadata_is_what_the_hub_reads() -> None:
    data = ModelCard(render_card(INFO)).data
    assert data.library_name == "ganns-async"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "mit"
    assert data.datasets == ["celeba"]
    assert {"pytorch", "gan", "dcgan", "celeba", "distributed-training", "model_hub_mixin"} <= set(data.tags)
    (result,) = data.eval_results
    assert result.metric_type == "swd" and result.metric_value == pytest.approx(73.14)
    assert result.task_type == "unconditional-image-generation" and result.dataset_type == "celeba"
    assert data.model_name == "faces"


@pytest.mark.parametrize("swd", [None, math.nan, math.inf, True, "0.1"])
def test_no_eval_result_without_a_finite_swd(swd: Any) -> None:
    card = render_card({**INFO, "swd": swd})
    assert ModelCard(card).data.eval_results is None
    assert "not recorded yet" in card


def test_card_body_says_what_the_run_did() -> None:
    card = render_card(INFO)
    for text in ("| Round (optimizer step) | 40 |", "| Images seen | 40,960 |", "| Contributing workers | 12 |",
                 "| 73.1 |", "32 alternating D/G Adam steps", 'Generator.from_pretrained("room101/faces")',
                 "(samples/latest.png)", "samples/step_000040.png", "(metrics.png)", "moving average"):
        assert text in card, text
    bare = render_card({"step": None})  # nothing known: still a valid card, no images
    assert "samples/latest.png" not in bare and "metrics.png" not in bare
    assert ModelCard(bare).data.library_name == "ganns-async"
    assert render_card(INFO) == card, "same facts, same bytes (no push for nothing)"


def test_worker_names_never_reach_the_card() -> None:
    card = render_card({**INFO, "workers": ["alice-laptop", "bob's pc"]})
    assert "alice" not in card and "bob" not in card and "| Contributing workers | 2 |" in card


def test_merge_keeps_prose_and_updates_figures() -> None:
    first = render_card(INFO)
    edited = (first.replace("## Intended use and limitations", "## Our class\n\nRoom 101, spring term.\n\n"
                            "## Intended use and limitations")
              .replace("license: mit", "license: cc-by-4.0").replace("tags:\n", "tags:\n- room-101\n"))
    later = render_card({**INFO, "step": 80, "swd": 50.0, "sample_name": "step_000080.png"})
    merged = merge_card(edited, later)
    assert "## Our class\n\nRoom 101, spring term." in merged
    assert "| Round (optimizer step) | 80 |" in merged and "step_000080.png" in merged
    assert "| Round (optimizer step) | 40 |" not in merged and "step_000040.png" not in merged
    data = ModelCard(merged).data
    assert data.license == "cc-by-4.0", "keys we do not own stay as the editor wrote them"
    assert "room-101" in data.tags and "dcgan" in data.tags
    assert data.eval_results[0].metric_value == pytest.approx(50.0)
    assert merge_card(merged, later) == merged, "merging again changes nothing"


def test_merge_respects_a_deleted_block_and_odd_cards() -> None:
    fresh = render_card(INFO)
    no_samples = re.sub(r"<!-- ganns-async:samples -->.*?<!-- /ganns-async:samples -->\n", "", fresh, flags=re.S)
    merged = merge_card(no_samples, render_card({**INFO, "step": 80}))
    assert "samples/latest.png" not in merged and "| Round (optimizer step) | 80 |" in merged
    assert merge_card(None, fresh) == fresh and merge_card("  \n", fresh) == fresh
    plain = merge_card("# Our model\n\nJust prose, no metadata.\n", fresh)
    assert plain.endswith("# Our model\n\nJust prose, no metadata.\n")
    assert ModelCard(plain).data.pipeline_tag == "unconditional-image-generation"
    broken = "---\nlicense: [unclosed\n---\nprose\n"
    assert ModelCard(merge_card(broken, fresh)).data.library_name == "ganns-async"


def _trainer() -> Trainer:
    trainer = Trainer(TrainConfig(seed=3))
    with torch.no_grad():  # weights a fresh Generator() would not have
        for p in trainer.sampler.parameters():
            p.add_(0.01)
    return trainer


def test_generator_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    trainer = _trainer()
    folder = write_generator(trainer, tmp_path, INFO)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".generator-")], "no temporary left behind"
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name

    loaded = Generator.from_pretrained(folder)
    assert not loaded.training
    want = trainer.sampler.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    z = torch.randn(4, 100, 1, 1, generator=torch.Generator().manual_seed(0))
    sampler = trainer.sampler.eval()
    with torch.no_grad():
        assert torch.equal(loaded(z), sampler(z))


def test_the_cards_own_snippet_loads_the_folder(tmp_path: Path) -> None:
    """The card's self-contained snippet (its own class, only torch + huggingface_hub) works."""
    trainer = _trainer()
    folder = write_generator(trainer, tmp_path, INFO)
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    snippet = next(b for b in blocks if "class Generator" in b)
    assert "ganns_async" not in snippet
    namespace: dict[str, Any] = {}
    exec(snippet.replace('"room101/faces"', repr(str(folder))), namespace)  # noqa: S102 - our own card
    assert namespace["faces"].shape == (16, 3, 64, 64)
    assert 0.0 <= float(namespace["faces"].min()) and float(namespace["faces"].max()) <= 1.0
    got = namespace["generator"].state_dict()
    assert all(torch.equal(v, got[k]) for k, v in trainer.sampler.state_dict().items())


def test_a_locally_edited_card_keeps_its_prose(tmp_path: Path) -> None:
    trainer = _trainer()
    card = write_generator(trainer, tmp_path, INFO) / "README.md"
    card.write_text(card.read_text().replace("## Dataset", "## Thanks\n\nTo everyone who joined.\n\n## Dataset"))
    write_generator(trainer, tmp_path, {**INFO, "step": 41})
    text = card.read_text()
    assert "## Thanks\n\nTo everyone who joined." in text and "| Round (optimizer step) | 41 |" in text


def test_a_narrow_run_loads_everywhere_at_its_width(tmp_path: Path) -> None:
    """--feature-maps 16: the folder, the card's own snippet and the checkpoint's text all
    give back a generator of that width (config.json holds it), and the card says so."""
    from ganns_async.model import count_parameters, feature_maps_of

    trainer = Trainer(TrainConfig(seed=3, feature_maps=16))
    info = {**INFO, "config": {**INFO["config"], "feature_maps": 16}}
    folder = write_generator(trainer, tmp_path, info)
    loaded = Generator.from_pretrained(folder)
    assert feature_maps_of(loaded.state_dict()) == 16
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trainer.sampler.state_dict().items())

    card = (folder / "README.md").read_text()
    assert f"- **Generator** ({count_parameters(trainer.g):,} parameters)" in card
    assert "| Width (feature maps, DCGAN's ngf = ndf) | 16 |" in card
    assert "`Generator(feature_maps=16)`" in card  # how the checkpoint's state dict loads
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "class Generator" in b)
    namespace: dict[str, Any] = {}
    exec(snippet.replace('"room101/faces"', repr(str(folder))), namespace)  # noqa: S102 - our own card
    assert namespace["faces"].shape == (16, 3, 64, 64)
    assert feature_maps_of(namespace["generator"].state_dict()) == 16


def test_the_default_width_is_the_model_cards() -> None:
    from ganns_async.model import Discriminator, count_parameters
    from ganns_async.model_card import (
        discriminator_parameters, generator_parameters,
    )

    assert TrainConfig().feature_maps == 64
    assert count_parameters(Trainer(TrainConfig()).g) == 3_576_704 == generator_parameters(64)
    assert count_parameters(Discriminator()) == 2_765_568 == discriminator_parameters(64)
    for f in (1, 8, 33):
        assert generator_parameters(f) == count_parameters(Generator(feature_maps=f))
        assert discriminator_parameters(f) == count_parameters(Discriminator(feature_maps=f))
    card = render_card(INFO)  # a run from before the option: no feature_maps in its config
    assert "| Width (feature maps, DCGAN's ngf = ndf) | 64 |" in card and "Generator(feature_maps=" not in card
