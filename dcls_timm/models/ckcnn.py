"""CKCNN: the original continuous-kernel CNN for sequences (SPEC 8.2), with the authors' published weights.

Paper: `CKConv: Continuous Kernel Convolution For Sequential Data` - https://arxiv.org/abs/2102.02611

Two residual blocks ``relu(dropout(relu(norm2(conv2(dropout(relu(norm1(conv1(x)))))))) + shortcut(x))`` of causal
SIREN CKConvs (:class:`dcls_timm.layers.SirenCKConv`, kernels as long as the input), ``GroupNorm(1, C, eps=1e-12)``
(over channels and the whole sequence, so the network is not strictly causal), a 1x1-conv shortcut where the width
changes (block 0), and ``Linear(H, classes)`` on the last time step. Input: ``[B, C, L]`` sequences or ``[B, C, H, W]``
images flattened row major, optionally permuted (``permute=True``: pMNIST, numpy seed 0).

Published weights (github.com/dwromero/ckconv, MIT), ``pretrained=True`` with a tag::

    timm.create_model('ckcnn_2_30.smnist', pretrained=True)     # input [B, 1, 28, 28], Normalize(0.1307, 0.3081)

Their flat state dicts (``backbone.{b}.cconv{1,2}.Kernel.kernel_net.{0,4,8}.*``, ``backbone.{b}.norm{1,2}.layer_norm.*``,
``backbone.0.shortcut.0.*``, ``finallyr.*``) load through :func:`checkpoint_filter_fn`.
"""
import re
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from dcls_timm.layers import SirenCKConv

from ._classifier_net import SequenceHead, SequenceInput, StemBlocksClassifier
from ._pretrained import build_dcls_model, dcls_cfg

__all__ = ['CKCNN', 'CKBlock', 'checkpoint_filter_fn']


class CKBlock(nn.Module):
    """Residual block of two causal SIREN CKConvs with GroupNorm(1, C) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, omega_0: float, kernel_hidden: int = 32,
                 dropout: float = 0., fft: str = 'auto', device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = SirenCKConv(in_channels, out_channels, omega_0, kernel_hidden, fft=fft, **dd)
        self.norm1 = nn.GroupNorm(1, out_channels, eps=1e-12, **dd)
        self.conv2 = SirenCKConv(out_channels, out_channels, omega_0, kernel_hidden, fft=fft, **dd)
        self.norm2 = nn.GroupNorm(1, out_channels, eps=1e-12, **dd)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.shortcut = nn.Conv1d(in_channels, out_channels, 1, **dd) if in_channels != out_channels \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.act(self.norm1(self.conv1(x))))
        out = self.drop(self.act(self.norm2(self.conv2(out))))
        return self.act(out + self.shortcut(x))


class CKCNN(StemBlocksClassifier):
    """CKCNN: ``depth`` residual CKConv blocks of width ``hidden`` and a last-step linear classifier (no stem, no
    final norm: feature index 0 is the input sequence, 1.. the blocks')."""

    def __init__(
            self,
            depth: int = 2,
            hidden: int = 30,
            num_classes: int = 10,
            in_chans: int = 1,
            omega_0: float = 30.5,
            kernel_hidden: int = 32,
            dropout: float = 0.,
            dropout_in: float = 0.,
            drop_rate: float = 0.,
            global_pool: str = 'last',
            fft: str = 'auto',
            permute: bool = False,
            permutation_seed: int = 0,
            permutation_length: int = 784,
            device=None,
            dtype=None,
    ):
        """
        Args:
            depth: Residual blocks (2 in the paper).
            hidden: Channels H of every block.
            num_classes: Classifier outputs.
            in_chans: Input channels (sequence features).
            omega_0: SIREN frequency scale (the published files' values are in their tags' ``model_args``).
            kernel_hidden: SIREN width (32).
            dropout: Dropout inside the blocks.
            dropout_in: Dropout on the input.
            drop_rate: Dropout before the classifier.
            global_pool: 'last' (the last time step, the paper's) or 'avg'.
            fft: FFT convolution: 'auto' (kernels longer than 50 taps), 'always', 'never'.
            permute, permutation_seed, permutation_length: A fixed step permutation (pMNIST: seed 0, 784 steps),
                stored as the ``seq_input.permutation`` buffer.
            device, dtype: Where and in which dtype to create the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.seq_input = SequenceInput(permute, permutation_seed, permutation_length, device=device)
        self.drop_in = nn.Dropout(dropout_in)
        self.stem = nn.Identity()  # none: the blocks read the input sequence
        self.blocks = nn.Sequential(*[
            CKBlock(in_chans if i == 0 else hidden, hidden, omega_0, kernel_hidden, dropout, fft, **dd)
            for i in range(depth)])
        self.norm = nn.Identity()
        self.feature_info = [dict(num_chs=in_chans, reduction=1, module='stem')] + [
            dict(num_chs=hidden, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = self.head_hidden_size = hidden
        self.head = SequenceHead(hidden, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^seq_input', blocks=r'^blocks\.(\d+)')


_PUBLISHED_RENAMES = (
    (re.compile(r'^backbone\.(\d+)\.cconv(\d)\.Kernel\.kernel_net\.(\d+)\.(.+)$'),
     lambda m: f'blocks.{m[1]}.conv{m[2]}.kernel_net.layers.{int(m[3]) // 4}.{m[4]}'),
    (re.compile(r'^backbone\.(\d+)\.cconv(\d)\.bias$'), lambda m: f'blocks.{m[1]}.conv{m[2]}.bias'),
    (re.compile(r'^backbone\.(\d+)\.norm(\d)\.layer_norm\.(weight|bias)$'),
     lambda m: f'blocks.{m[1]}.norm{m[2]}.{m[3]}'),
    (re.compile(r'^backbone\.(\d+)\.shortcut\.0\.(weight|bias)$'), lambda m: f'blocks.{m[1]}.shortcut.{m[2]}'),
    (re.compile(r'^finallyr\.(weight|bias)$'), lambda m: f'head.fc.{m[1]}'),
)
# buffers of the authors' CKConv: a stale kernel cache and the training length (for other sampling rates)
_PUBLISHED_IGNORED = re.compile(r'^backbone\.\d+\.cconv\d\.(conv_kernel|train_length)$')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The authors' flat state dict (github.com/dwromero/ckconv ``saved/*.pt``) to this model's keys; this model's
    own layout passes through. ``conv_kernel`` and ``train_length`` are dropped; a permuted model keeps its own
    permutation when the file has none."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _PUBLISHED_IGNORED.match(key):
            continue
        for pattern, rename in _PUBLISHED_RENAMES:
            m = pattern.match(key)
            if m:
                key = rename(m)
                break
        out[key] = value
    permutation = getattr(getattr(model, 'seq_input', None), 'permutation', None)
    if permutation is not None and 'seq_input.permutation' not in out:
        out['seq_input.permutation'] = permutation
    return out


def _create_ckcnn(variant: str, pretrained: bool = False, **kwargs) -> CKCNN:
    return build_dcls_model(CKCNN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                            feature_cfg=dict(flatten_sequential=True, out_indices=(1, 2)), **kwargs)


_REPO = 'https://github.com/dwromero/ckconv'
_RAW = _REPO + '/raw/d44c6441a98792477d6259368c210089bb33fe7a/saved/'
_TAIL = '_kernnohid_32_kernact_Sine_kernomega0_{w}_bs_64_optim_Adam_lr_0.001_ep_200_dpin_{din}_dp_{dp}_wd_{wd}' \
        '_seed_0_sched_plateau_schdec_5.0_pat_{pat}.pt'
_MNIST = dict(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
_CIFAR = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # ImageNet mean/std
_MFCC = dict(input_size=(20, 1, 161), mean=(0.,) * 20, std=(1.,) * 20)  # 20 MFCC features x 161 steps, as given


def _cfg(url: str = '', *, omega_0: Optional[float] = None, accuracy: Optional[float] = None,
         inputs: str = '', model_args: Optional[Dict[str, Any]] = None, **kwargs) -> Dict[str, Any]:
    args = dict(model_args or {})
    notes: Tuple[str, ...] = ()
    if url:
        args['omega_0'] = omega_0
        notes = (f'input: {inputs}', f'paper test accuracy {accuracy} (best epoch, test set used as validation)')
    return dcls_cfg(
        url, model_args=args if url else None, notes=notes,
        **{'num_classes': 10, 'crop_pct': 1.0, 'interpolation': 'bilinear', 'pool_size': None,
           'first_conv': 'blocks.0.conv1.kernel_net.layers.2', 'classifier': 'head.fc',
           'paper_ids': 'arXiv:2102.02611', 'paper_name': 'CKConv: Continuous Kernel Convolution For Sequential Data',
           **({'origin_url': _REPO} if url else {}), **_MNIST, **kwargs})


def _published(prefix: str, hidden: int, w: str, din: str, dp: str, wd: str = '0.0', pat: int = 20) -> str:
    return _RAW + f'{prefix}model_CKCNN_blcks_2_nohid_{hidden}' + _TAIL.format(w=w, din=din, dp=dp, wd=wd, pat=pat)


_SMNIST_IN = 'sMNIST: [B, 1, 28, 28] flattened row major to 1 x 784, Normalize(0.1307, 0.3081)'
_PMNIST_IN = 'pMNIST: sMNIST permuted by numpy seed 0 permutation(784) (built in: permute=True)'
_SCIFAR_IN = 'sCIFAR10: [B, 3, 32, 32] flattened row major to 3 x 1024, ImageNet mean/std'
_MFCC_IN = 'Speech Commands MFCC (10 classes): [B, 20, 161] (or [B, 20, 1, 161]) MFCC features'

default_cfgs = generate_default_cfgs({
    'ckcnn_2_30.smnist': _cfg(
        _published('MNIST_perm_False_', 30, '31.09', '0.1', '0.1'), omega_0=31.09195739463897, accuracy=99.31,
        inputs=_SMNIST_IN, model_args=dict(dropout=0.1, dropout_in=0.1)),
    'ckcnn_2_30.pmnist': _cfg(
        _published('MNIST_perm_True_', 30, '43.46', '0.1', '0.0'), omega_0=43.45667389601194, accuracy=98.00,
        inputs=_PMNIST_IN, model_args=dict(dropout_in=0.1, permute=True, permutation_seed=0)),
    'ckcnn_2_30.scifar10': _cfg(
        _published('CIFAR10_', 30, '25.7', '0.0', '0.2'), omega_0=25.696, accuracy=62.25, inputs=_SCIFAR_IN,
        model_args=dict(dropout=0.2), **_CIFAR),
    'ckcnn_2_30.speech_mfcc': _cfg(
        _published('SpeechCommands_mfcc_True_', 30, '30.9', '0.0', '0.2', pat=15), omega_0=30.90257553169801,
        accuracy=95.27, inputs=_MFCC_IN, model_args=dict(dropout=0.2), **_MFCC),
    'ckcnn_2_100.smnist': _cfg(
        _published('MNIST_perm_False_', 100, '30.5', '0.2', '0.2'), omega_0=30.5, accuracy=99.32,
        inputs=_SMNIST_IN, model_args=dict(dropout=0.2, dropout_in=0.2)),
    'ckcnn_2_100.pmnist': _cfg(
        _published('MNIST_perm_True_', 100, '42.16', '0.2', '0.0'), omega_0=42.161651744476515, accuracy=98.54,
        inputs=_PMNIST_IN, model_args=dict(dropout_in=0.2, permute=True, permutation_seed=0)),
    'ckcnn_2_100.scifar10': _cfg(
        _published('CIFAR10_', 100, '25.7', '0.0', '0.3', wd='0.0001'), omega_0=25.696, accuracy=63.74,
        inputs=_SCIFAR_IN, model_args=dict(dropout=0.3), **_CIFAR),
})


@register_model
def ckcnn_2_30(pretrained: bool = False, **kwargs) -> CKCNN:
    """CKCNN, 2 blocks of width 30 (98,286 params on sMNIST, 100,386 on sCIFAR10, 118,236 on Speech MFCC)."""
    return _create_ckcnn('ckcnn_2_30', pretrained, **dict(dict(depth=2, hidden=30), **kwargs))


@register_model
def ckcnn_2_100(pretrained: bool = False, **kwargs) -> CKCNN:
    """CKCNN, 2 blocks of width 100 (1,030,546 params on sMNIST, 1,037,546 on sCIFAR10)."""
    return _create_ckcnn('ckcnn_2_100', pretrained, **dict(dict(depth=2, hidden=100), **kwargs))
