"""Curves and a summary from swift's ``logging.jsonl``.

    python -m cispo_swift plot RUN_DIR [RUN_DIR ...] -o curves.png [--label NAME ...] [--smooth N]
    python -m cispo_swift summary RUN_DIR [RUN_DIR ...] [-k 5] [--json]

A RUN_DIR is swift's ``--output_dir`` (the newest ``vN-TIMESTAMP/logging.jsonl`` under it is read), a
``vN-TIMESTAMP`` directory, or a ``logging.jsonl`` file. swift appends one JSON object per logging step with
the trainer's metrics under their own names (``reward``, ``grad_norm``, ``cispo_clip_ratio``, and the
plugin's ``cispo/clip_frac`` ...; an ``eval_`` prefix only in evaluation) plus ``global_step/max_steps``.
With ``--num_iterations`` > 1 the rollout metrics (``reward`` ...) are only logged on steps that generated,
and training ends with one summary object without a step, which is skipped.
"""

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

STEP_KEY = 'global_step/max_steps'
# The drift from the sampling policy and the steps skipped because of it (CISPO_KL_BUDGET) or for want of a signal
# (CISPO_SKIP_NO_SIGNAL) come first: the real-model recipe rests on them.
PANELS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ('reward', ('reward',)),
    ('drift from the sampling policy (approx KL)', ('cispo/approx_kl',)),
    ('optimizer steps skipped (share)', ('cispo/kl_budget_skipped', 'cispo/no_signal_skipped')),
    ('importance weights', ('cispo/ratio_mean', 'cispo/ratio_min', 'cispo/ratio_max', 'cispo/weight_mean')),
    ('clipped tokens, and tokens PPO would give no gradient', ('cispo/clip_frac', 'cispo/ppo_zero_grad_frac',
                                                                'cispo_clip_ratio')),
    ('grad norm', ('grad_norm',)),
)  # fmt: skip
# Drawn when a run has held-out evaluations (heldout.jsonl beside logging.jsonl: `--callbacks cispo_heldout`).
HELDOUT_PANEL = ('held-out greedy accuracy', ('heldout/greedy_acc',))
# swift's built-in key; the plugin logs it too (equal to cispo/clip_frac_pos), drawn only for runs without the plugin.
BUILTIN_CLIP_KEY = 'cispo_clip_ratio'
# What `summary` prints (those a run logged), with grad_norm.
CISPO_KEYS = (
    'cispo/approx_kl', 'cispo/kl_budget_skipped', 'cispo/no_signal_skipped', 'cispo/clip_frac', 'cispo/clip_frac_pos',
    'cispo/clip_frac_neg', BUILTIN_CLIP_KEY, 'cispo/ratio_mean', 'cispo/ratio_min', 'cispo/ratio_max',
    'cispo/weight_mean', 'cispo/ppo_zero_grad_frac',
)  # fmt: skip
_LINESTYLES = ('-', '--', ':', '-.')


def find_logging_jsonl(run_dir: str) -> str:
    """The ``logging.jsonl`` of a run: the file itself, ``run_dir/logging.jsonl``, or the newest ``vN-*`` one."""
    if os.path.isfile(run_dir):
        return run_dir
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f'{run_dir} does not exist: pass a swift output_dir, its vN-* dir or a logging.jsonl.')
    direct = os.path.join(run_dir, 'logging.jsonl')
    if os.path.isfile(direct):
        return direct
    found = glob.glob(os.path.join(glob.escape(run_dir), 'v*-*', 'logging.jsonl'))

    def version(path: str) -> Tuple[int, str]:
        name = os.path.basename(os.path.dirname(path))
        m = re.match(r'v(\d+)-', name)
        return (int(m.group(1)) if m else -1, name)

    if not found:
        raise FileNotFoundError(
            f'no logging.jsonl in {run_dir!r} or its vN-TIMESTAMP/ subdirectories. swift writes it to '
            f'OUTPUT_DIR/vN-TIMESTAMP/logging.jsonl (OUTPUT_DIR/logging.jsonl with --add_version false); '
            f'pass one of those, or the file itself.'
        )
    return max(found, key=version)


def load_log(run_dir: str) -> List[Dict]:
    """The logged steps of a run, in order, each with an integer ``step`` added."""
    path = find_logging_jsonl(run_dir)
    try:
        with open(path, encoding='utf-8') as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(
            f'{path} is not a text file ({error.reason} at byte {error.start}): pass the logging.jsonl that swift '
            'writes, or its run directory.'
        ) from None
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if i < len(lines) - 1:
                raise ValueError(_not_jsonl(path, number, error.msg, '\n'.join(line for _, line in lines))) from None
            # A run killed while swift wrote its last row leaves that row cut off.
            print(f'warning: {path}, line {number} (the last) is cut off; skipping it.', file=sys.stderr)
            continue
        if STEP_KEY not in row:
            continue  # the end-of-training summary
        row['step'] = int(str(row[STEP_KEY]).split('/')[0])
        rows.append(row)
    # Held-out evaluations (cispo_swift.demo.heldout, `--callbacks cispo_heldout`) as rows of their own.
    heldout = os.path.join(os.path.dirname(path), 'heldout.jsonl')
    if os.path.isfile(heldout):
        with open(heldout) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    rows.append({'step': int(record['step']), 'heldout/greedy_acc': float(record['greedy_acc'])})
        rows.sort(key=lambda r: r['step'])  # stable: logged rows keep their order
    return rows


def _not_jsonl(path: str, number: int, reason: str, text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return f'{path}, line {number}: not JSON ({reason}); the file is damaged.'
    return (
        f"{path} is one JSON document, not swift's logging.jsonl (one JSON object per line): pass the run directory "
        '(swift --output_dir), its vN-TIMESTAMP directory, or the logging.jsonl in it.'
    )


def series(rows: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of the rows that logged ``key`` as a finite number."""
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(row['step'])
            values.append(float(v))
    return steps, values


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def summarize_run(run_dir: str, k: int = 5) -> Dict:
    """First-vs-last reward and the CISPO metrics of one run.

    Returns ``{'logging_jsonl', 'steps', 'k', 'reward_first', 'reward_last', 'last', 'mean'}``:
    ``reward_first``/``reward_last`` are the means of the first/last ``k`` logged rewards (fewer if the run
    logged fewer), ``last``/``mean`` map each CISPO metric present (and ``grad_norm``) to its last logged
    value / its mean over the run.
    """
    if k < 1:
        raise ValueError(f'k={k}: the reward is averaged over the first and last k logged steps, so k must be >= 1.')
    path = find_logging_jsonl(run_dir)
    rows = load_log(path)
    _, reward = series(rows, 'reward')
    if not reward:
        raise ValueError(f'{path} has no "reward" entries: did the run reach its first logging step?')
    out = {
        'logging_jsonl': path,
        'steps': rows[-1]['step'],
        'k': k,
        'reward_first': _mean(reward[:k]),
        'reward_last': _mean(reward[-k:]),
        'last': {},
        'mean': {},
    }
    for key in CISPO_KEYS + ('grad_norm',):
        _, values = series(rows, key)
        if values:
            out['last'][key] = values[-1]
            out['mean'][key] = _mean(values)
    return out


def _smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _panels(runs: Sequence[Sequence[Dict]]) -> List[Tuple[str, Tuple[str, ...]]]:
    """PANELS, with each reward function's mean (``rewards/NAME/mean``) added to the reward panel when there
    are several (with a single one it repeats ``reward``), and HELDOUT_PANEL when a run has held-out evaluations."""
    per_func = sorted({k for rows in runs for row in rows for k in row if re.fullmatch(r'rewards/.+/mean', k)})
    panels = list(PANELS)
    if len(per_func) > 1:
        panels[0] = ('reward', ('reward', *per_func))
    if any(HELDOUT_PANEL[1][0] in row for rows in runs for row in rows):
        panels.append(HELDOUT_PANEL)
    return panels


def _drawn(rows: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    """`series`, but nothing for swift's clip key in a run that logs the plugin's own clip fractions."""
    if key == BUILTIN_CLIP_KEY and series(rows, 'cispo/clip_frac')[0]:
        return [], []
    return series(rows, key)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'plotting needs matplotlib, which is not installed: pip install "cispo-swift[plot]" '
            '(or pip install matplotlib).'
        ) from e
    return Figure


def plot_runs(
    run_dirs: Sequence[str],
    out_png: str,
    labels: Optional[Sequence[str]] = None,
    smooth: int = 1,
    title: Optional[str] = None,
) -> List[str]:
    """Draw one panel per metric group present in any run, runs overlaid, to ``out_png``.

    Returns the titles of the panels drawn. Panels whose keys no run logged are left out. The line style tells the
    keys apart; with several runs the colour is the run (with one, the colour is the key too).
    ``smooth`` is a trailing moving-average window over logged points (1 = raw).
    """
    if not run_dirs:
        raise ValueError('no run directories given: pass at least one swift output_dir or logging.jsonl.')
    if labels is None:
        labels = [os.path.normpath(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'{len(labels)} labels for {len(run_dirs)} runs: give one label per run, or none.')
    Figure = _figure_class()
    runs = [load_log(d) for d in run_dirs]
    panels = [(t, keys) for t, keys in _panels(runs) if any(_drawn(rows, k)[0] for rows in runs for k in keys)]
    if not panels:
        raise ValueError(f'none of the plotted keys appear in {list(run_dirs)}: {[k for _, ks in PANELS for k in ks]}')

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.6 * nrows), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f'C{i % 10}' for i in range(max(len(runs), 4))]
    for ax, (panel_title, keys) in zip(axes, panels):
        for r, (rows, label) in enumerate(zip(runs, labels)):
            for j, key in enumerate(keys):
                steps, values = _drawn(rows, key)
                if not steps:
                    continue
                if len(runs) == 1:  # line style too, so that curves lying on top of each other stay visible
                    style = {'color': colors[j], 'linestyle': _LINESTYLES[j % 4], 'label': key}
                else:
                    style = {'color': colors[r], 'linestyle': _LINESTYLES[j % 4], 'label': f'{label}: {key}'}
                if key.startswith('heldout/'):  # a few evaluations: points, never smoothed
                    ax.plot(steps, values, linewidth=1.4, marker='o', **style)
                else:
                    ax.plot(steps, _smooth(values, smooth), linewidth=1.4, **style)
        ax.set_title(panel_title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title or len(runs) == 1:
        fig.suptitle(title or labels[0])
    out_dir = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return [t for t, _ in panels]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m cispo_swift plot', description='Plot swift GRPO/CISPO runs.')
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='swift output_dir, vN-* dir or logging.jsonl')
    p.add_argument('-o', '--out', required=True, help='PNG file to write')
    p.add_argument('--label', action='append', dest='labels', help='legend name per run (repeat, in order)')
    p.add_argument('--smooth', type=int, default=1, help='moving-average window in logged points (default 1: raw)')
    p.add_argument('--title', default=None)
    a = p.parse_args(argv)
    if a.smooth < 1:
        p.error(f'--smooth {a.smooth}: the moving-average window counts logged points, so it must be ≥ 1 (1: raw).')
    if os.path.isdir(a.out):
        p.error(f'-o {a.out} is a directory: name the PNG file to write, e.g. -o {os.path.join(a.out, "curves.png")}.')
    try:
        panels = plot_runs(a.run_dirs, a.out, labels=a.labels, smooth=a.smooth, title=a.title)
    except (OSError, ValueError) as error:
        return _fail('plot', error)
    print(f'wrote {a.out} ({", ".join(panels)})')
    return 0


def _fail(command: str, error: Exception) -> int:
    print(f'python -m cispo_swift {command}: {error}', file=sys.stderr)
    return 2


def _format_summary(label: str, s: Dict) -> str:
    lines = [
        f'{label}  ({s["logging_jsonl"]}, {s["steps"]} steps)',
        f'  reward: first {s["k"]} logged {s["reward_first"]:.3f} -> last {s["k"]} logged {s["reward_last"]:.3f}',
    ]
    for key, last in s['last'].items():
        lines.append(f'  {key:<28} last {last:<10.4g} run mean {s["mean"][key]:.4g}')
    return '\n'.join(lines)


def summary_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m cispo_swift summary', description='First-vs-last reward and CISPO metrics of swift runs.'
    )
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='swift output_dir, vN-* dir or logging.jsonl')
    p.add_argument('-k', type=int, default=5, help='average the reward over the first/last k logged steps')
    p.add_argument('--json', action='store_true', help='print one JSON object per run instead')
    a = p.parse_args(argv)
    for d in a.run_dirs:
        try:
            s = summarize_run(d, k=a.k)
        except (OSError, ValueError) as error:
            return _fail('summary', error)
        print(json.dumps({'run': d, **s}) if a.json else _format_summary(d, s))
    return 0
