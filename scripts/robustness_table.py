#!/usr/bin/env python
"""The paper-style robustness table of several models from their validate.py results files.

    python scripts/robustness_table.py results/convnext_tiny.json results/convnext_tiny_dcls.json --out tables/

writes ``robustness_table.md`` and ``robustness_table.csv`` (model, params, ImageNet top-1, mCE, relative mCE,
ImageNet-A, -R, Sketch, Stylized top-1), ``imagenet_c_per_corruption.csv`` (top-1 error per corruption, averaged over
the severities) and ``imagenet_c_errors.png`` (that error per corruption, the models side by side). Numbers on a
generated ImageNet-C-style set keep that label in every table and the plot. Suites a results file lacks are shown as
"-"; an unfinished (interrupted) results file is marked as such.
"""
import argparse
import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcls_timm.evaluation.metrics import ALL_CORRUPTIONS, CORRUPTIONS  # noqa: E402

COLUMNS = ['model', 'params_m', 'img_size', 'imagenet_top1', 'mce', 'relative_mce', 'imagenet_a_top1',
           'imagenet_r_top1', 'sketch_top1', 'stylized_top1', 'imagenet_c_data', 'checkpoint', 'notes', 'file']
HEADERS = {'model': 'Model', 'params_m': 'Params (M)', 'img_size': 'Size', 'imagenet_top1': 'ImageNet top-1',
           'mce': 'mCE ↓', 'relative_mce': 'rel. mCE ↓', 'imagenet_a_top1': 'IN-A top-1',
           'imagenet_r_top1': 'IN-R top-1', 'sketch_top1': 'Sketch top-1', 'stylized_top1': 'Stylized top-1',
           'imagenet_c_data': 'ImageNet-C data', 'notes': 'Notes'}
MARKDOWN_COLUMNS = ['model', 'params_m', 'img_size', 'imagenet_top1', 'mce', 'relative_mce', 'imagenet_a_top1',
                    'imagenet_r_top1', 'sketch_top1', 'stylized_top1', 'imagenet_c_data', 'notes']


def load(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f'robustness_table.py: error: cannot read {path} ({e})')
    if not isinstance(results, dict) or 'suites' not in results or 'model' not in results:
        raise SystemExit(f'robustness_table.py: error: {path} is not a validate.py JSON results file '
                         f'(for --results-format csv runs, pass <results-file>.progress.json)')
    return results


def _top1(suites: Dict[str, Any], name: str) -> Optional[float]:
    entry = suites.get(name) or {}
    return entry.get('top1')


def mean_errors(c: Dict[str, Any]) -> Dict[str, float]:
    """Top-1 error (fraction) per corruption, averaged over the severities evaluated."""
    if c.get('mean_error'):
        return dict(c['mean_error'])
    return {k: sum(v.values()) / len(v) for k, v in (c.get('errors') or {}).items() if v}


def row(results: Dict[str, Any], path: str, name: Optional[str] = None) -> Dict[str, Any]:
    suites = results['suites']
    c = suites.get('imagenet-c') or {}
    notes = []
    if results.get('status') not in (None, 'complete'):
        notes.append(f"{results['status']} run")
    if c and not c.get('complete', False):
        notes.append('ImageNet-C incomplete (no mCE)')
    skipped = sum(v.get('skipped', 0) for v in suites.values() if isinstance(v, dict))
    if skipped:
        notes.append(f'{skipped} unreadable images skipped')
    return {
        'model': name or results['model'],
        'params_m': round(results['param_count'] / 1e6, 2) if results.get('param_count') else None,
        'img_size': results.get('img_size'),
        'imagenet_top1': _top1(suites, 'imagenet'),
        'mce': c.get('mce'), 'relative_mce': c.get('relative_mce'),
        'imagenet_a_top1': _top1(suites, 'imagenet-a'), 'imagenet_r_top1': _top1(suites, 'imagenet-r'),
        'sketch_top1': _top1(suites, 'sketch'), 'stylized_top1': _top1(suites, 'stylized'),
        'imagenet_c_data': c.get('label', '') if c else '',
        'checkpoint': results.get('checkpoint', ''), 'notes': '; '.join(notes), 'file': path,
    }


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or value == '':
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def markdown(rows: List[Dict[str, Any]], per_corruption: Dict[str, Dict[str, float]], corruptions: Sequence[str]
             ) -> str:
    labels = sorted({r['imagenet_c_data'] for r in rows if r['imagenet_c_data']})
    lines = ['# Robustness', '']
    if labels:
        lines += [f"ImageNet-C numbers: {' / '.join(labels)}. mCE and relative mCE against AlexNet (lower is "
                  f"better); the other columns are top-1 accuracy (%).", '']
    cols = [c for c in MARKDOWN_COLUMNS if c != 'notes' or any(r['notes'] for r in rows)]
    lines.append('| ' + ' | '.join(HEADERS[c] for c in cols) + ' |')
    lines.append('|' + '|'.join('---' if c in ('model', 'imagenet_c_data', 'notes') else '---:' for c in cols) + '|')
    for r in rows:
        lines.append('| ' + ' | '.join(_cell(r[c]) for c in cols) + ' |')
    if per_corruption:
        names = [r['model'] for r in rows if r['model'] in per_corruption]
        lines += ['', f"## Top-1 error (%) per corruption, mean over severities ({' / '.join(labels)})", '',
                  '| Corruption | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
        for corruption in corruptions:
            vals = [per_corruption[n].get(corruption) for n in names]
            extra = '' if corruption in CORRUPTIONS else ' (not in mCE)'
            lines.append(f'| {corruption}{extra} | ' + ' | '.join(
                _cell(100 * v if v is not None else None, 1) for v in vals) + ' |')
    return '\n'.join(lines) + '\n'


def plot(rows: List[Dict[str, Any]], per_corruption: Dict[str, Dict[str, float]], corruptions: Sequence[str],
         path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [r['model'] for r in rows if r['model'] in per_corruption]
    labels = {r['model']: r['imagenet_c_data'] for r in rows}
    shared = sorted({labels[n] for n in names})
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(corruptions) + 3), 4.8))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, c in enumerate(corruptions) if c in per_corruption[n]]
        ys = [100 * per_corruption[n][c] for c in corruptions if c in per_corruption[n]]
        legend = n if len(shared) == 1 else f'{n} [{labels[n]}]'
        ax.bar(xs, ys, width=width, label=legend, color=plt.cm.tab10(i % 10))
    ax.set_xticks(range(len(corruptions)))
    ax.set_xticklabels([c.replace('_', ' ') for c in corruptions], rotation=45, ha='right')
    ax.set_ylabel('top-1 error (%), mean over severities')
    ax.set_ylim(0, 100)
    ax.set_title(f"Error per corruption — {' / '.join(shared)}")
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def unique_names(results: List[Dict[str, Any]], paths: Sequence[str]) -> List[str]:
    """The model names, made unique with the results file's name where two files evaluate the same model."""
    names = [r['model'] for r in results]
    return [n if names.count(n) == 1 else f'{n} ({os.path.splitext(os.path.basename(p))[0]})'
            for n, p in zip(names, paths)]


def main(argv=None) -> Dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('results', nargs='+', help='validate.py JSON results files')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--names', nargs='+', default=None, help='row names, one per results file (default: the models)')
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.results):
        p.error(f'--names: {len(args.names)} names for {len(args.results)} results files')
    loaded = [load(path) for path in args.results]
    names = args.names or unique_names(loaded, args.results)
    rows = [row(r, path, n) for r, path, n in zip(loaded, args.results, names)]
    per_corruption = {n: mean_errors(r['suites']['imagenet-c']) for n, r in zip(names, loaded)
                      if r['suites'].get('imagenet-c')}
    corruptions = [c for c in ALL_CORRUPTIONS if any(c in v for v in per_corruption.values())]

    os.makedirs(args.out, exist_ok=True)
    out = {'markdown': os.path.join(args.out, 'robustness_table.md'),
           'csv': os.path.join(args.out, 'robustness_table.csv')}
    text = markdown(rows, per_corruption, corruptions)
    with open(out['markdown'], 'w') as f:
        f.write(text)
    with open(out['csv'], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: ('' if v is None else v) for k, v in r.items()} for r in rows])
    if per_corruption:
        out['per_corruption_csv'] = os.path.join(args.out, 'imagenet_c_per_corruption.csv')
        with open(out['per_corruption_csv'], 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['model', 'imagenet_c_data', *corruptions])
            for r in rows:
                if r['model'] in per_corruption:
                    e = per_corruption[r['model']]
                    writer.writerow([r['model'], r['imagenet_c_data'],
                                     *[round(100 * e[c], 3) if c in e else '' for c in corruptions]])
        out['plot'] = os.path.join(args.out, 'imagenet_c_errors.png')
        plot(rows, per_corruption, corruptions, out['plot'])
    print(text)
    print('wrote ' + ', '.join(out.values()))
    return out


if __name__ == '__main__':
    main()
