"""What the training-method benchmarks share: statistics over seeds, the `swift rlhf` run loop that keeps finished
runs, and the plotting of curves with their medians.

Used by `scripts/bench_sample_efficiency.py` (tiny model), `scripts/bench_smollm2_efficiency.py` and
`scripts/bench_cispo_stability.py` (SmolLM2). Censored values (a run that never reached a threshold) are +inf
throughout: they rank after every observed value.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]

OFFLINE_ENV = {
    'MODELSCOPE_OFFLINE': '1',
    'HF_HUB_OFFLINE': '1',
    'TOKENIZERS_PARALLELISM': 'false',
    'OMP_NUM_THREADS': '1',  # one thread: on a shared 2-core machine more threads spin against other jobs
    'CUDA_VISIBLE_DEVICES': '',
}

# ---- statistics -------------------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) where censored runs are +inf, ranked after every observed
    value. All runs are censored at the same step, so a quantile below the share of censored runs is exact; one
    that touches a censored run is +inf, reported as '> max_steps'."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi:
        return xs[lo]
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_iqr(values: Sequence[float]) -> Dict[str, float]:
    return {'median': quantile(values, 0.5), 'q25': quantile(values, 0.25), 'q75': quantile(values, 0.75)}


def median_range(values: Sequence[float]) -> Dict[str, float]:
    return {'median': quantile(values, 0.5), 'min': min(values), 'max': max(values)}


def rank_test(a: Sequence[float], b: Sequence[float]) -> Dict:
    """Two-sided Mann-Whitney U test of a vs b (ties and +inf handled by mid-ranks). Exact permutation p-value for
    up to 20 values in all, else the normal approximation with tie correction. U counts pairs with a > b (ties
    half)."""
    import itertools

    a, b = list(a), list(b)
    n, m = len(a), len(b)
    if not n or not m:
        return {'U': math.nan, 'p': math.nan, 'n': [n, m]}

    def u_of(xs: Sequence[float], ys: Sequence[float]) -> float:
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in xs for y in ys)

    u = u_of(a, b)
    mean = n * m / 2
    pooled = a + b
    if n + m <= 20:
        extreme = abs(u - mean)
        count = total = 0
        for idx in itertools.combinations(range(n + m), n):
            chosen = set(idx)
            xs = [pooled[i] for i in idx]
            ys = [pooled[i] for i in range(n + m) if i not in chosen]
            total += 1
            count += abs(u_of(xs, ys) - mean) >= extreme - 1e-12
        return {'U': u, 'p': count / total, 'n': [n, m], 'method': 'exact permutation'}
    ties = {}
    for v in pooled:
        ties[v] = ties.get(v, 0) + 1
    tie_term = sum(t**3 - t for t in ties.values()) / ((n + m) * (n + m - 1))
    var = n * m / 12 * ((n + m + 1) - tie_term)
    z = 0.0 if var <= 0 else (u - mean) / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2))
    return {'U': u, 'p': p, 'n': [n, m], 'method': 'normal approximation'}


def longest_run(values: Sequence[float], predicate: Callable[[float], bool]) -> int:
    """Length of the longest stretch of consecutive values for which `predicate` holds."""
    best = cur = 0
    for v in values:
        cur = cur + 1 if predicate(v) else 0
        best = max(best, cur)
    return best


def finite_json(o):
    """JSON-safe copy: ±inf as strings (json would write Infinity, which is not JSON)."""
    if isinstance(o, float) and math.isinf(o):
        return 'inf' if o > 0 else '-inf'
    if isinstance(o, dict):
        return {str(k): finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    return o


def versions() -> Dict[str, str]:
    from importlib.metadata import version

    out = {'python': platform.python_version(), 'platform': platform.platform(), 'cpus': str(os.cpu_count())}
    for pkg in ('ms-swift', 'torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets'):
        out[pkg] = version(pkg)
    try:
        out['cispo-swift git'] = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# ---- running ----------------------------------------------------------------------------------------------------

DONE_FILE = 'run.json'


def run_swift(flags: Sequence[str], run_dir: Path, env_extra: Mapping[str, str]) -> Dict[str, float]:
    """One `swift rlhf` process writing into `run_dir` (train.log there); returns its wall and CPU seconds.

    `CISPO_*` variables of the calling environment are dropped (each run sets its own in `env_extra`), so a shell
    that exported one cannot change an arm unnoticed.
    """
    return run_command([str(Path(sys.executable).parent / 'swift'), 'rlhf', *flags], run_dir, env_extra)


def run_command(cmd: Sequence[str], run_dir: Path, env_extra: Mapping[str, str]) -> Dict[str, float]:
    """`run_swift` for any command (e.g. an example script): output to run_dir/train.log, `CISPO_*` variables of the
    calling environment dropped, this interpreter's bin directory first on PATH; returns wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    env.update(OFFLINE_ENV, PYTHONPATH=str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    env['PATH'] = str(Path(sys.executable).parent) + os.pathsep + env.get('PATH', '')
    env.update(env_extra)
    t0 = time.time()
    log_path = run_dir / 'train.log'
    with open(log_path, 'w') as f:
        proc = subprocess.Popen(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT)
        # This child's own CPU time (os.wait4): RUSAGE_CHILDREN would also count runs finishing alongside it.
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f'{Path(cmd[0]).name} exited with {code}; log: {log_path}')
    return {'wall_s': round(time.time() - t0, 1), 'cpu_s': round(usage.ru_utime + usage.ru_stime, 1)}


def finished(run_dir: Path) -> Optional[Dict]:
    """The record a finished run left (`run.json`), or None: the run loop skips runs that have one."""
    path = run_dir / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mark_finished(run_dir: Path, record: Dict) -> None:
    tmp = run_dir / (DONE_FILE + '.tmp')
    tmp.write_text(json.dumps(finite_json(record)))
    tmp.replace(run_dir / DONE_FILE)  # atomic: an interrupted write leaves no half record


def run_all(jobs: Sequence[Dict], run_one: Callable[[Dict], Dict], parallel: int = 1) -> List[Dict]:
    """Run every job (a dict with at least 'run_dir') not finished yet, `parallel` at a time, and return the records
    of all jobs in order. A failed job is reported and recorded as {'failed': message}, the others go on."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: Dict) -> Dict:
        run_dir = Path(job['run_dir'])
        done = finished(run_dir)
        if done is not None:
            return done
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            record = run_one(job)
        except Exception as e:  # a failed run is a result too; it is reported, not retried
            record = {'failed': f'{type(e).__name__}: {e}'}
            print(f'FAILED {run_dir}: {record["failed"]}', flush=True)
        mark_finished(run_dir, record)
        return record

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, jobs))


# ---- plots ------------------------------------------------------------------------------------------------------


def plot_curves(ax, curves_by_arm: Mapping[str, Sequence[Sequence[Sequence[float]]]], label_suffix: str = '') -> None:
    """Each run thin, the median over runs at each x thick, one colour per arm."""
    for i, (arm, curves) in enumerate(curves_by_arm.items()):
        color = f'C{i}'
        by_x: Dict[float, List[float]] = {}
        for curve in curves:
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
            for x, y in curve:
                by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        ax.plot(xs, [quantile(by_x[x], 0.5) for x in xs], color=color, linewidth=2.2,
                label=f'{arm} (median of {len(curves)}{label_suffix})')  # fmt: skip
    ax.grid(alpha=0.3)
