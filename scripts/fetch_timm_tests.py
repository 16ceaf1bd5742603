"""Fetch timm's own model tests for the installed timm version, so they run against the plugin's models.

Downloads the sdist of the installed timm from PyPI (``pip download --no-deps --no-binary :all: timm==<version>``)
once into ``.cache/timm-sdist/``, and writes its ``tests/test_models.py`` to
``tests/timm_contract/test_timm_models.py``, where ``tests/timm_contract/conftest.py`` selects the plugin's models.
Exits non-zero with one line when the sdist cannot be had (the test command then fails rather than skip them).
"""
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, 'tests', 'timm_contract', 'test_timm_models.py')


def main() -> int:
    import timm
    version = timm.__version__
    cache = os.path.join(ROOT, '.cache', 'timm-sdist')
    sdist = os.path.join(cache, f'timm-{version}.tar.gz')
    stamp = f'# timm {version} tests/test_models.py (fetched by scripts/fetch_timm_tests.py; not part of the repo)\n'
    if os.path.isfile(TARGET):
        with open(TARGET) as f:
            if f.readline() == stamp:
                return 0
    if not os.path.isfile(sdist):
        os.makedirs(cache, exist_ok=True)
        cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', cache]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(sdist):
            last = (result.stderr.strip().splitlines() or ['no output'])[-1]
            print(f'error: cannot download the timm {version} sdist for its model tests ({last})', file=sys.stderr)
            return 1
    member = f'timm-{version}/tests/test_models.py'
    with tarfile.open(sdist) as tar:
        try:
            source = tar.extractfile(member).read().decode()
        except KeyError:
            print(f'error: {sdist} has no {member}', file=sys.stderr)
            return 1
    tmp = TARGET + '.partial'
    with open(tmp, 'w') as f:
        f.write(stamp + source)
    os.replace(tmp, TARGET)
    print(f'[test] timm {version} model tests fetched into {os.path.relpath(TARGET, ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
