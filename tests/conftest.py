import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')

FASHION_MNIST_HOW_TO_GET = (
    'Fashion-MNIST is needed by the learning tests. Get it one of these ways: install the Debian package '
    '(`apt-get install -y dataset-fashion-mnist`, as root; `bash scripts/test.sh` does it when it can), or set '
    'DCLS_TIMM_FASHION_MNIST to a directory holding FashionMNIST/raw or the four *-ubyte.gz files, or run where '
    'torchvision can download it (internet access). DCLS_TIMM_REQUIRE_DATA=0 lets these tests skip instead.')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _has_raw(root: Path) -> bool:
    from dcls_timm.training.data import _FASHION_MNIST_FILES
    return all((root / 'FashionMNIST' / 'raw' / n).is_file() for n in _FASHION_MNIST_FILES)


@pytest.fixture(scope='session')
def fashion_mnist_root(tmp_path_factory):
    """A directory holding ``FashionMNIST/raw/<the four IDX files>`` (torchvision's layout), for the learning tests.

    From the Debian package ``dataset-fashion-mnist``, else ``$DCLS_TIMM_FASHION_MNIST``, else a torchvision download.
    Without any of them: a failure when ``DCLS_TIMM_REQUIRE_DATA=1`` (``scripts/test.sh`` sets it), else a skip.
    """
    from dcls_timm.training.data import FASHION_MNIST_DEBIAN_DIR, prepare_fashion_mnist
    root = tmp_path_factory.mktemp('fashion_mnist')
    tried = []
    # 1. the Debian package's gzipped files, unpacked into the session's directory
    if prepare_fashion_mnist(str(root), FASHION_MNIST_DEBIAN_DIR):
        return root
    tried.append(f'no Debian package files in {FASHION_MNIST_DEBIAN_DIR}')
    # 2. a directory named by the user: FashionMNIST/raw already unpacked, or the four .gz files
    user = os.environ.get('DCLS_TIMM_FASHION_MNIST')
    if user:
        user_dir = Path(user).expanduser()
        if _has_raw(user_dir):
            return user_dir
        for source in (user_dir, user_dir / 'FashionMNIST' / 'raw'):
            if prepare_fashion_mnist(str(root), source):
                return root
        tried.append(f'DCLS_TIMM_FASHION_MNIST={user} holds neither FashionMNIST/raw nor the four .gz files')
    # 3. torchvision's download (a bounded wait where the network is filtered)
    from torchvision.datasets import FashionMNIST
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        if _has_raw(root):
            return root
        tried.append('torchvision download left no files')
    except Exception as e:  # no network, a mirror down, a checksum mismatch...
        tried.append(f'torchvision download failed: {type(e).__name__}: {" ".join(str(e).split())[:300]}')
    finally:
        socket.setdefaulttimeout(previous)
    message = f'{FASHION_MNIST_HOW_TO_GET} (tried: {"; ".join(tried)})'
    if os.environ.get('DCLS_TIMM_REQUIRE_DATA') == '1':
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_configure(config):
    # pytest-xdist workers share the cores: one torch thread each unless the user chose (scripts/test.sh sets
    # OMP_NUM_THREADS=1 for the subprocesses the tests start as well)
    if os.environ.get('PYTEST_XDIST_WORKER') and 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)
