"""ImageNet-C bookkeeping: corruption errors (CE), mCE, relative mCE, against AlexNet's errors."""
from typing import Dict, Mapping, Optional, Sequence

__all__ = ['CORRUPTIONS', 'CORRUPTION_GROUPS', 'EXTRA_CORRUPTIONS', 'ALL_CORRUPTIONS', 'ALEXNET_ERRORS',
           'ALEXNET_CLEAN_ERROR', 'corruption_summary']

CORRUPTION_GROUPS = {
    'noise': ('gaussian_noise', 'shot_noise', 'impulse_noise'),
    'blur': ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur'),
    'weather': ('snow', 'frost', 'fog', 'brightness'),
    'digital': ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression'),
}
CORRUPTIONS = tuple(c for group in CORRUPTION_GROUPS.values() for c in group)  # the 15 of the mCE
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')  # reported apart, not in the mCE
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS

# AlexNet top-1 error averaged over the 5 severities (Hendrycks & Dietterich), and on clean ImageNet val
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360,
    'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324, 'brightness': 0.564592,
    'contrast': 0.853204, 'elastic_transform': 0.646056, 'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}
ALEXNET_CLEAN_ERROR = 0.4348


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def corruption_summary(
        errors: Mapping[str, Mapping[int, float]],
        clean_error: Optional[float] = None,
) -> Dict[str, object]:
    """Summarise top-1 errors (fractions in [0, 1]) per corruption and severity.

    ``CE_c = sum_s E_sc / sum_s E^AlexNet_sc``; AlexNet's per-severity errors enter through their mean, so this is
    ``mean_s E_sc / ALEXNET_ERRORS[c]``. The relative CE subtracts the clean errors:
    ``(mean_s E_sc - E_clean) / (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR)``. mCE (x100) averages the 15 CEs and needs
    all 15 corruptions with all 5 severities, a group's mean (noise, blur, weather, digital) all of its
    corruptions with all 5; partial sets still get per-corruption numbers.

    Returns:
        ``mean_error`` per corruption, ``ce`` and ``relative_ce`` per mCE corruption, ``mce``, ``relative_mce``,
        ``unnormalized_mean_error``, ``group_mean_error``, ``extra_mean_error``, and ``complete``.
    """
    mean_error = {c: _mean([errors[c][s] for s in sorted(errors[c])]) for c in errors}
    full = [c for c in CORRUPTIONS if c in errors and sorted(errors[c]) == [1, 2, 3, 4, 5]]
    ce = {c: 100 * mean_error[c] / ALEXNET_ERRORS[c] for c in full}
    out: Dict[str, object] = {
        'mean_error': mean_error,
        'ce': ce,
        'complete': len(full) == len(CORRUPTIONS),
        # a group's mean over its corruptions with all 5 severities only: a partial run's severity 1 alone would
        # read as a low group error
        'group_mean_error': {g: _mean([mean_error[c] for c in cs]) for g, cs in CORRUPTION_GROUPS.items()
                             if all(c in full for c in cs)},
        'extra_mean_error': {c: mean_error[c] for c in EXTRA_CORRUPTIONS if c in mean_error},
    }
    if full:
        out['unnormalized_mean_error'] = _mean([mean_error[c] for c in full])
    if out['complete']:
        out['mce'] = _mean(list(ce.values()))
    if clean_error is not None and full:
        rel = {c: 100 * (mean_error[c] - clean_error) / (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR) for c in full}
        out['relative_ce'] = rel
        if out['complete']:
            out['relative_mce'] = _mean(list(rel.values()))
    return out
