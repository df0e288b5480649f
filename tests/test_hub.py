"""Publishing (model cards + upload through an injected HfApi) and pulling from a warm offline cache. No network."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import gear_hf.hub as hub
from gear_hf import GEARForCausalImageLM, GEARPipeline, GEARTokenizerModel
from gear_hf.hub import GEARHubMixin, create_model_card, model_card_template_path, push_to_hub

from test_pipeline import NAMES, gens, tiny_ar, tiny_tokenizer

REPO = "me/gear-tiny"

pytestmark = pytest.mark.usefixtures("one_torch_thread")



class FakeHfApi:
    """Records create_repo / upload_folder calls and copies the uploaded folder (it is a temp dir)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = self.tmp_path / f"upload{len(self.uploads)}"
        shutil.copytree(folder_path, copy)
        files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
        self.uploads.append(SimpleNamespace(repo_id=repo_id, folder=copy, files=files, kwargs=kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)

    @property
    def card(self) -> str:
        return (self.uploads[-1].folder / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(1234)
    pipe = GEARPipeline(vq_model=tiny_tokenizer(), transformer=tiny_ar(), id2label=NAMES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def api(tmp_path):
    return FakeHfApi(tmp_path)


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_templates_ship_with_the_repo():
    for kind in ("tokenizer", "generator", "pipeline"):
        path = model_card_template_path(kind)
        assert path.is_file() and path.parent.name == "model_cards"
    with pytest.raises(ValueError, match="Unknown model card kind"):
        model_card_template_path("scheduler")


def test_push_pipeline_uploads_every_file_and_our_card(pipe, api):
    push_to_hub(pipe, REPO, api=api, private=True, license="apache-2.0", datasets="ILSVRC/imagenet-1k",
                tags=["imagenet"], training={"stage": "2 (AR on frozen GEAR tokenizer)", "steps": 1000,
                                             "optim": {"ar_lr": 1e-4}},
                metrics={"gFID": 12.3})
    assert api.created == [(REPO, {"private": True, "exist_ok": True, "repo_type": "model", "token": None})]
    (upload,) = api.uploads
    assert upload.repo_id == REPO and upload.kwargs["commit_message"] == "Upload gear_hf pipeline (GEARPipeline)"
    expected = {"README.md", "model_index.json", "transformer/config.json", "transformer/model.safetensors",
                "vq_model/config.json", "vq_model/model.safetensors"}
    assert expected <= set(upload.files)
    assert set(upload.files) - expected <= {"transformer/generation_config.json"}

    meta = card_metadata(api.card)
    assert meta["library_name"] == "gear_hf"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["ILSVRC/imagenet-1k"]
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"gear_hf", "gear", "imagenet", "vq"} <= set(meta["tags"])
    text = api.card
    assert f'GEARPipeline.from_pretrained("{REPO}")' in text
    assert 'pipe("class0", preset="demo"' in text  # label names from id2label in the snippet
    assert "the **tokenizer** (`vq_model/`" in text and "**autoregressive generator**" in text
    assert "| stage | 2 (AR on frozen GEAR tokenizer) |" in text and "| optim.ar_lr | 0.0001 |" in text
    assert "| gFID | 12.3 |" in text
    assert 'preset `"fid"`' in text and "guidance_scale=1.0" in text and "top_k=0" in text
    assert "VIRTUAL_imagenet256_labeled.npz" in text and "bicubic" in text
    assert "`transformer/model.safetensors`" in text  # the file list
    # what was uploaded loads back and samples the same images
    loaded = GEARPipeline.from_pretrained(upload.folder)
    loaded.set_progress_bar_config(disable=True)
    a = pipe([1, 2], generator=gens(0, 1), output_type="latent").images
    b = loaded([1, 2], generator=gens(0, 1), output_type="latent").images
    assert torch.equal(a, b)


def test_pipeline_push_to_hub_and_save_pretrained_use_our_card(pipe, api, tmp_path):
    pipe.push_to_hub(REPO, api=api, license="mit", commit_message="v1")
    assert api.uploads[-1].kwargs["commit_message"] == "v1"
    assert card_metadata(api.card)["library_name"] == "gear_hf"

    save_dir = tmp_path / "local"
    pipe.save_pretrained(save_dir, push_to_hub=True, repo_id=REPO, api=api, license="mit")
    assert (save_dir / "README.md").is_file() and (save_dir / "model_index.json").is_file()
    assert "README.md" in api.uploads[-1].files and card_metadata(api.card)["license"] == "mit"


def test_push_tokenizer_card(api):
    tokenizer = tiny_tokenizer()
    push_to_hub(tokenizer, "me/tok", api=api, license="apache-2.0", metrics={"rFID": 1.64, "PSNR": 20.78})
    assert set(api.uploads[-1].files) == {"README.md", "config.json", "model.safetensors"}
    meta = card_metadata(api.card)
    assert meta["library_name"] == "gear_hf" and "pipeline_tag" not in meta
    assert "image-tokenizer" in meta["tags"]
    text = api.card
    assert "**image tokenizer only**" in text and "no autoregressive generator" in text.lower()
    assert 'GEARTokenizerModel.from_pretrained("me/tok")' in text
    assert "| codebook size K | 64 |" in text and "**bicubic** interpolation" in text and "| rFID | 1.64 |" in text
    assert GEARTokenizerModel.from_pretrained(api.uploads[-1].folder).config.codebook_size == 64


def test_push_generator_card_and_custom_cards(api):
    model = tiny_ar()
    push_to_hub(model, "me/ar", api=api, training={"stage": 1})
    meta = card_metadata(api.card)
    assert meta["library_name"] == "gear_hf" and "license" not in meta
    text = api.card
    assert "**autoregressive generator only**" in text and "There is **no tokenizer**" in text
    assert 'GEARForCausalImageLM.from_pretrained("me/ar")' in text
    assert "guidance_scale=4.0" in text and "top_k=2000" in text  # the demo preset is spelled out next to fid
    assert isinstance(GEARForCausalImageLM.from_pretrained(api.uploads[-1].folder), GEARForCausalImageLM)

    push_to_hub(model, "me/ar", api=api, model_card=False)
    assert "README.md" not in api.uploads[-1].files
    push_to_hub(model, "me/ar", api=api, model_card="---\nlicense: mit\n---\n# hand-written")
    assert api.card.endswith("# hand-written")
    with pytest.raises(ValueError, match="not both"):
        push_to_hub(model, "me/ar", api=api, model_card="# x", license="mit")
    with pytest.raises(TypeError, match="Cannot publish"):
        push_to_hub(torch.nn.Linear(1, 1), "me/x", api=api)


def test_hub_mixin_routes_model_push_to_our_card(api, tmp_path):
    assert issubclass(GEARTokenizerModel, GEARHubMixin) and issubclass(GEARForCausalImageLM, GEARHubMixin)
    model = GEARTokenizerModel(tiny_tokenizer().config)
    model.push_to_hub("me/tok2", api=api, tags=["extra"], license="apache-2.0")
    meta = card_metadata(api.card)
    assert meta["library_name"] == "gear_hf" and "extra" in meta["tags"]
    assert set(api.uploads[-1].files) == {"README.md", "config.json", "model.safetensors"}

    model.save_pretrained(tmp_path / "tok3", push_to_hub=True, repo_id="me/tok3", api=api, metrics={"rFID": 2.0})
    assert api.uploads[-1].repo_id == "me/tok3" and "| rFID | 2.0 |" in api.card
    assert (tmp_path / "tok3" / "README.md").is_file()
    model.save_pretrained(tmp_path / "plain")  # a plain save still works and writes no card
    assert not (tmp_path / "plain" / "README.md").exists() and len(api.uploads) == 2


def test_card_round_trips_through_huggingface_hub(pipe, tmp_path):
    card = create_model_card(pipe, repo_id=REPO, license="apache-2.0", base_model="BinLin203/GEAR-VQ")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "gear_hf" and loaded.data.base_model == "BinLin203/GEAR-VQ"
    with pytest.raises(ValueError, match="interpolation"):
        create_model_card(pipe, interpolation="nearest")


# ------------------------------------------------------------------------------------------- offline pulls
def warm_cache(cache_dir: Path, repo_id: str, save) -> Path:
    """Lay out `cache_dir` as huggingface_hub's cache holding one snapshot of `repo_id` (files written by `save`)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    save(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir / "snapshots" / commit


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(hub.HfApi, "upload_folder", no_network)


def test_pull_pipeline_and_models_from_offline_cache(pipe, tmp_path, offline):
    cache = tmp_path / "hub"
    warm_cache(cache, REPO, pipe.save_pretrained)

    loaded = GEARPipeline.from_pretrained(REPO, cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == pipe.id2label
    a = pipe([3, "alias4"], generator=gens(7, 8), output_type="np").images
    b = loaded([3, "alias4"], generator=gens(7, 8), output_type="np").images
    assert np.array_equal(a, b)

    tokenizer = GEARTokenizerModel.from_pretrained(REPO, subfolder="vq_model", cache_dir=cache)
    generator = GEARForCausalImageLM.from_pretrained(REPO, subfolder="transformer", cache_dir=cache)
    for name, tensor in pipe.vq_model.state_dict().items():
        assert torch.equal(tensor, tokenizer.state_dict()[name]), name
    assert torch.equal(generator.output.weight, pipe.transformer.output.weight)


def test_pull_with_default_cache_location(pipe, tmp_path, offline, monkeypatch):
    cache = tmp_path / "default-cache"
    warm_cache(cache, "me/tok-only", pipe.vq_model.save_pretrained)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    tokenizer = GEARTokenizerModel.from_pretrained("me/tok-only")
    assert torch.equal(tokenizer.quantize.embedding.weight, pipe.vq_model.quantize.embedding.weight)
    with pytest.raises(OSError):
        GEARTokenizerModel.from_pretrained("me/never-downloaded")
    with pytest.raises(OSError, match="not fully cached locally"):
        GEARPipeline.from_pretrained("me/never-downloaded")
