"""Results output: a readable table, JSON/CSV with timm's columns, and the ImageNet-C plot."""
import csv
import io
import json
from typing import Any, Dict, List, Sequence

from .metrics import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS
from .store import atomic_write_text

__all__ = ['format_table', 'write_results', 'plot_imagenet_c', 'csv_rows']

CSV_COLUMNS = ['model', 'suite', 'top1', 'top1_err', 'top5', 'top5_err', 'loss', 'mce', 'relative_mce',
               'images', 'classes', 'param_count', 'img_size', 'crop_pct', 'interpolation', 'checkpoint', 'ema',
               'input_size', 'crop_mode', 'mean', 'std', 'size_source', 'skipped', 'images_per_sec', 'precision',
               'imagenet_c_label']


def _data_config_columns(results: Dict[str, Any]) -> Dict[str, Any]:
    """The eval data config as CSV cells: input_size '3x224x224', mean/std space-separated."""
    dc = results.get('data_config') or {}
    out = {k: dc.get(k, '') for k in ('crop_mode', 'size_source')}
    out['input_size'] = 'x'.join(str(v) for v in dc['input_size']) if 'input_size' in dc else ''
    for k in ('mean', 'std'):
        out[k] = ' '.join(f'{v:g}' for v in dc[k]) if k in dc else ''
    return out


def _corruption_cells(entry: Dict[str, Any], corruptions: Sequence[str]) -> List[float]:
    return [e for c in corruptions for e in entry['errors'].get(c, {}).values()]


def csv_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per suite (and per clean-ImageNet companion subset); ImageNet-C's top-1 is the mean over its
    evaluated cells of the 15 mCE corruptions, the 4 extra corruptions' in an ``imagenet-c:extra`` row of their
    own."""
    rows = []
    for suite, r in results['suites'].items():
        entries = [(suite, r)] + [(f'{suite}:{k}', v) for k, v in r.items() if k.endswith('-classes')]
        if 'errors' in r and _corruption_cells(r, EXTRA_CORRUPTIONS):
            entries.append((f'{suite}:extra', {'errors': r['errors'], 'extra': True, 'label': r.get('label', '')}))
        for name, entry in entries:
            row = {k: results[k] for k in ('model', 'param_count', 'img_size', 'crop_pct', 'interpolation',
                                          'checkpoint', 'ema')}
            row.update(_data_config_columns(results))
            row['suite'] = name
            if 'top1' in entry:
                row.update(top1=round(entry['top1'], 3), top1_err=round(100 - entry['top1'], 3),
                           top5=round(entry['top5'], 3), top5_err=round(100 - entry['top5'], 3),
                           loss=round(entry['loss'], 4))
            if 'errors' in entry:
                # ImageNet-C: each evaluated cell (corruption, severity) weighs alike, as in the mCE; the 4 extra
                # corruptions are not part of the benchmark's numbers and get their own row
                errs = _corruption_cells(entry, EXTRA_CORRUPTIONS if entry.get('extra') else CORRUPTIONS)
                if errs:
                    row.update(top1=round(100 * (1 - sum(errs) / len(errs)), 3),
                               top1_err=round(100 * sum(errs) / len(errs), 3))
                row['mce'] = round(entry['mce'], 3) if 'mce' in entry else ''
                row['relative_mce'] = round(entry['relative_mce'], 3) if 'relative_mce' in entry else ''
            row['images'] = entry.get('images', '')
            row['classes'] = entry.get('classes', '')
            row['skipped'] = entry.get('skipped', '')
            ips = entry.get('images_per_sec')
            row['images_per_sec'] = round(ips, 1) if isinstance(ips, (int, float)) else ''
            row['precision'] = results.get('precision', '')
            row['imagenet_c_label'] = entry.get('label', '') if 'errors' in entry else ''
            rows.append(row)
    return rows


def _preprocessing_line(results: Dict[str, Any]) -> List[str]:
    dc = results.get('data_config')
    if not dc:
        return []
    source = {'explicit': 'from the command line', 'test': 'test size', 'train': 'train size',
              'default': "timm's default size"}.get(dc.get('size_source'), dc.get('size_source'))
    return [f"input {'x'.join(str(v) for v in dc['input_size'])} ({source}), crop_pct {dc['crop_pct']} "
            f"{dc['crop_mode']}, {dc['interpolation']}"]


def format_table(results: Dict[str, Any]) -> str:
    rows = csv_rows(results)
    any_skipped = any(isinstance(r.get('skipped'), int) and r['skipped'] > 0 for r in rows)
    lines = [f"{results['model']} ({results['param_count']:,} params, checkpoint: {results['checkpoint'] or '-'}"
             f"{', EMA' if results['ema'] else ''}{', ' + results['precision'] if results.get('precision') else ''})",
             *_preprocessing_line(results),
             f"{'suite':<30}{'images':>9}{'classes':>9}{'top1':>9}{'top5':>9}{'mCE':>9}{'rel mCE':>9}{'img/s':>9}"
             + (f"{'skipped':>9}" if any_skipped else '')]
    for row in rows:
        def num(key, digits=2):
            return f'{row[key]:>9.{digits}f}' if isinstance(row.get(key), float) else f"{'':>9}"
        lines.append(f"{row['suite']:<30}{row['images']!s:>9}{row['classes']!s:>9}{num('top1')}{num('top5')}"
                     f"{num('mce')}{num('relative_mce')}{num('images_per_sec', 1)}"
                     + (f"{row['skipped']!s:>9}" if any_skipped else ''))
    c = results['suites'].get('imagenet-c')
    if c:
        lines.append(f"ImageNet-C ({c['label']}; preprocessing: {c['preprocessing']}): "
                     f"top-1 error % per corruption, severities 1-5, CE")
        for corruption, sev in c['errors'].items():
            sev = {int(k): v for k, v in sev.items()}
            ce = c['ce'].get(corruption)
            marks = c.get('skipped_cells', {})
            lines.append(f'  {corruption:<20}' + ''.join(
                (f'{100 * sev[s]:>6.1f}' + ('*' if f'{corruption}/{s}' in marks else ' ')) if s in sev else f"{'-':>6} "
                for s in range(1, 6)) + (f'  CE {ce:6.1f}' if ce is not None else ''))
        for group, err in c.get('group_mean_error', {}).items():
            lines.append(f'  mean error {group:<9} {100 * err:6.2f} %')
        if c.get('skipped_cells'):
            lines.append('  * cells with unreadable images skipped: '
                         + ', '.join(f'{k} ({v})' for k, v in c['skipped_cells'].items()))
    if any_skipped:
        total = sum(r['skipped'] for r in rows if isinstance(r.get('skipped'), int) and ':' not in r['suite'])
        lines.append(f'{total} unreadable image(s) skipped (--skip-unreadable) and left out of every denominator; '
                     f"the files are listed in the results file (units.<unit>.skipped_files)")
    return '\n'.join(lines)


def write_results(results: Dict[str, Any], path: str, fmt: str) -> None:
    """Write ``results`` as JSON (everything) or CSV (one row per suite), atomically (temporary file, fsync,
    replace)."""
    if fmt == 'json':
        text = json.dumps(results, indent=2) + '\n'
    else:
        buf = io.StringIO(newline='')
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(csv_rows(results))
        text = buf.getvalue()
    atomic_write_text(path, text)


def plot_imagenet_c(result: Dict[str, Any], path: str, title: str) -> None:
    """Top-1 error per corruption (x) and severity (one bar per severity), saved as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    errors = {c: {int(k): v for k, v in sev.items()} for c, sev in result['errors'].items()}
    names = [c for c in ALL_CORRUPTIONS if c in errors]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 3), 4.5))
    width = 0.16
    for s in range(1, 6):
        xs = [i + (s - 3) * width for i, c in enumerate(names) if s in errors[c]]
        ys = [100 * errors[c][s] for c in names if s in errors[c]]
        ax.bar(xs, ys, width=width, label=f'severity {s}', color=plt.cm.viridis((s - 1) / 4))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace('_', ' ') for n in names], rotation=45, ha='right')
    ax.set_ylabel('top-1 error (%)')
    ax.set_ylim(0, 100)
    summary = f" — mCE {result['mce']:.1f}" if 'mce' in result else ''
    ax.set_title(f"{title}: {result['label']}{summary}")
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
